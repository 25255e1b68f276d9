"""A generated manga corpus with known answers, for the demo and the tests only (never imported by a stage):
deterministic and synthetic, the shared fixture of ingestion, colour classification and retrieval.

Every later stage is tested against this corpus, so its layout and labels are a contract. The seed fixes every
random choice and the same seed gives byte-identical files (with the same Pillow/libjpeg/libwebp/zlib/numpy).
The preset fixes the *structure* (series, chapters, page counts, formats, where the odd files sit); the seed
fixes the *content* (cast colours and shapes, panel layouts, placements).

Layout under ``root`` (what a user's dump looks like)::

    <series>/<chapter>/<page files>      chapter as a folder (``kind`` "folder")
    <series>/<chapter>.cbz               chapter as a zip (``kind`` "archive"), pages flat or in a subfolder

Chapters hold full-colour pages (styles ``colour``, ``colour_light``: mostly white with small colour areas,
``colour_muted``: low saturation) or black-and-white pages (``grey``, ``screentone``, ``sepia``: uniform warm tint
plus paper noise, ``chroma_noise``: grey page as an RGB 4:2:0 JPEG with colour fringes), some B&W chapters with a
colour ``cover`` as page 0. Stored oddities: unpadded names (``1.jpg, 2.jpg, 10.jpg``), JPEG/PNG/WebP, upper-case
extensions, EXIF-rotated JPEGs (Orientation 6 or 8; applying it yields the upright page), P, RGBA (transparent
margins over white), LA, CMYK, 16-bit (I;16) and bilevel (1) pages, double-page spreads, near-duplicate pages, and
broken files: a truncated JPEG, an empty file, a text file named ``.jpg`` and a decompression bomb (a small PNG
declaring `files.BOMB_SIZE`).

Modules, in the order a page is made:

    labels      the label vocabulary and records, and where the labels and summary go
    plans       the presets as explicit chapter plans (structure)
    cast        seeded random streams, colours and each series' cast
    drawing     the pen and the characters
    pages       backgrounds, speech bubbles, panel layouts, pages and covers
    styles      colour variants and the B&W conversions
    files       encodings, junk entries and the decompression bomb
    builder     a chapter's files and labels, written as a folder or an archive
    generate    `generate_corpus` and its command line
"""
