"""cbir-orb: OpenCV's ORB as a cbir local feature, and the Hamming matcher its binary
descriptors need. A worked example of a cbir plugin (CONTRIBUTING.md): nothing here is
imported by cbir until a user names ``orb`` or ``hamming``."""
