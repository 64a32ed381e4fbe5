"""The auditor service."""
