"""Helpers shared by tests in several directories: servers, crafted JOSE, client and review set-ups."""
