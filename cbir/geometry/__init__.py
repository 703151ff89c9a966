"""Cameras, poses and (later) triangulation, absolute pose, rig and sequence tools."""
