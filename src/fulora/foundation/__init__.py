"""fulora's tiny foundation model ``fulora:phantom-sd``: corpus, architecture, build, card."""
