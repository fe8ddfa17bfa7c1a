"""CytoEdge export package."""
