"""Test support shipped with the package because the lab reuses it (fake API server, netns)."""
