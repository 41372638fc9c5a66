"""Cost accounting: device peaks, FLOPs, MFU."""
