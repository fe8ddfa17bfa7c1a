"""CytoEdge calibration package."""
