"""Shared by every suite: pytest puts this folder on sys.path, so ``warmpod_live`` imports everywhere."""
