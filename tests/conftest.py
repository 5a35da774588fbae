"""Shared by tests/python and tests/torch: pytest puts this folder on sys.path when it loads this
file (rootdir-relative conftest, no __init__.py), so both suites import tests/file_safety.py."""
