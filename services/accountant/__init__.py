"""The accountant service."""
