"""Where a computation runs: devices, precision and process groups (torch only)."""
