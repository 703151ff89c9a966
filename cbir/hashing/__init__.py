"""Compact binary codes: learned hash functions, binary code stores, Hamming search and the
hashing metrics (issue 29).

A hash function here maps a float descriptor ``x`` (a row of a global store) to ``B`` bits,
``b = [(x - mean) W > thresholds]``: random projections (``lsh``), PCA with iterative
quantization (``itq``), or a hash layer learned from labels on frozen descriptors (``dpsh``,
``hashnet``, ``dsdh``). Each method is a plugin of the entry-point group ``cbir.hashers``
(:mod:`cbir.plugins`); :class:`~cbir.hashing.model.HashModel` is what any of them trains,
saved as one ``.npz`` file; its codes are written as a global store of packed bits
(formats/SPEC.md 7a) and searched by Hamming distance (:mod:`cbir.hashing.search`).
"""
