"""End to end: real server processes, the fleet, a browser, the CLI, and attacks on the whole service."""
