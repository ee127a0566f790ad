"""Test package: makes test modules importable by name (``tests.test_x``) in DistPool worker processes."""
