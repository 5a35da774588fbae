"""Train the demo's DigitsCNN on scikit-learn's digits and write its shipped weights file.

Usage: python scripts/train_demo_model.py [--epochs 40] [--seed 0] [--out PATH]
Default output: python/obc_native/demo/digits_cnn.safetensors (used by `obc-native demo`).
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from obc_native.demo.model import WEIGHTS_PATH, accuracy, load_data, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=WEIGHTS_PATH)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data()
    model = train_model(data, epochs=args.epochs, seed=args.seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata={"epochs": str(args.epochs), "seed": str(args.seed)})
    print(f"test accuracy {accuracy(model, data.test_x, data.test_y):.2f}%  -> {args.out}")


if __name__ == "__main__":
    main()
