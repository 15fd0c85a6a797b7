"""The demo world: glyph images, training, small nets and the attack zoo (demo, tests and bench use them)."""
