"""Input files: which files are images (`files`), decoding one safely (`decode`: pixel limits, EXIF orientation,
HEIC/AVIF, DCT-scaled JPEG), reading and hashing many in worker processes (`loader`), and caption corpora
(`captions`).

Layer: above `errors`, `config` and `paths`; below everything else. Indexing, search, evaluation and fine-tuning all
read their inputs through here, so an image or a caption file is read one way everywhere.
"""
