"""The format layer: kapture text, columnar HDF5 stores, pairs, maps, import/export."""
