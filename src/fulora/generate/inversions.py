"""AUTOMATIC1111's textual-inversion embeddings: read from their files, found in prompts.

A1111 loads every embedding in its embeddings folder and names each after its file
(``easynegative.safetensors``: "easynegative"); a prompt that holds the name, as CLIP's
tokenizer reads it, gets the embedding's vectors in place of the name's tokens
(``fulora.generate.prompts.a1111_chunks``, ``fulora.lora.conditioning.chunked_embeddings``).
Its text lists the embeddings a prompt used under "TI hashes", each with the first 12 hex
digits of its file's SHA-256.

The files A1111 reads (its ``create_embedding_from_data``): a ``.pt`` of its own training
(``string_to_param``, one term), a ``.bin`` or ``.safetensors`` of one tensor (diffusers'
concepts; ``emb_params``). ``.pt`` and ``.bin`` are read with ``torch.load(weights_only=True)``,
which runs no code from the file. Embeddings stored inside images and SDXL's (``clip_g`` and
``clip_l``) are not read, and a folder's images are passed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fulora.errors import ConfigError, DataError
from fulora.generate.prompts import CHUNK_TOKENS, EmbeddingNames
from fulora.io import file_hash

# A1111's embedding files (its load_from_file); images are its other kind, not read here
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class TextualInversion:
    """One embedding: its name (the file's stem), vectors (n, hidden) in fp32, file, SHA-256."""

    name: str
    vectors: torch.Tensor
    path: Path
    sha256: str

    @property
    def short_hash(self) -> str:
        """A1111's hash of it in "TI hashes": the file's SHA-256, 12 hex digits."""
        return self.sha256[:12]

    @property
    def listed_name(self) -> str:
        """Its name as A1111 lists it in "TI hashes"."""
        return listed_name(self.name)


def listed_name(name: str) -> str:
    """An embedding's name as A1111 lists it in "TI hashes": without ':' and ','."""
    return name.replace(":", "").replace(",", "")


@dataclass(frozen=True)
class TextualInversions:
    """The run's embeddings by name, and the lookup that finds them in a prompt's tokens."""

    by_name: dict[str, TextualInversion]
    names: EmbeddingNames

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        """Each embedding's vectors by name (``chunked_embeddings``'s)."""
        return {name: inversion.vectors for name, inversion in self.by_name.items()}


def embedding_files(paths: list[str]) -> list[Path]:
    """The embedding files that ``paths`` give: files as given, folders' files (recursively).

    Raises:
        ConfigError: A path that does not exist, a file that is no embedding A1111 reads, or
            two files of one name (A1111 would use one of them as it finds them).
    """
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES)
            files += [p for p in found if p.is_file() and p.stat().st_size > 0]
        elif path.is_file() and path.suffix.lower() in EMBEDDING_SUFFIXES:
            files.append(path)
        elif path.is_file():
            raise ConfigError(
                f"embeddings: {path} is no embedding file fulora reads (A1111's "
                f"{', '.join(EMBEDDING_SUFFIXES)}): give those, or their folder"
            )
        else:
            raise ConfigError(f"embeddings: {path} does not exist: give embedding files or folders")
    by_name: dict[str, Path] = {}
    for file in files:
        if file.stem in by_name and by_name[file.stem] != file:
            raise ConfigError(
                f"embeddings: {by_name[file.stem]} and {file} are both named {file.stem!r} "
                "(A1111 names an embedding after its file): give one of them"
            )
        by_name[file.stem] = file
    return list(by_name.values())


def load_textual_inversions(
    paths: list[str], tokenizer, hidden_size: int, hashes: dict[str, str] | None = None
) -> TextualInversions:
    """The embeddings of ``paths`` (files or folders), as A1111 loads them.

    Args:
        paths: Embedding files and folders (``generate``'s ``embeddings``).
        tokenizer: The pipeline's CLIP tokenizer (to find the names in prompts).
        hidden_size: The text encoder's width, which each vector must have.
        hashes: Each file's SHA-256 by name, where already computed (the run's plan); None:
            computed here.

    Raises:
        ConfigError: A path or name as :func:`embedding_files` and ``EmbeddingNames`` refuse.
        DataError: A file that holds no embedding A1111 reads, or one of another width.
    """
    by_name = {}
    for file in embedding_files(paths):
        vectors = read_embedding(file)
        shaped = vectors.dim() == 2 and vectors.shape[-1] == hidden_size
        if not shaped or not 1 <= len(vectors) <= CHUNK_TOKENS:
            raise DataError(
                f"{file}: its embedding is {tuple(vectors.shape)} (vectors x width), and this "
                f"model's text encoder takes 1 to {CHUNK_TOKENS} vectors of {hidden_size}: give "
                "an embedding trained for this base model (SD1.x: 768)"
            )
        sha256 = hashes[file.stem] if hashes is not None else file_hash(file)
        by_name[file.stem] = TextualInversion(file.stem, vectors, file, sha256)
    names = EmbeddingNames(tokenizer, {name: len(e.vectors) for name, e in by_name.items()})
    return TextualInversions(by_name, names)


def read_embedding(path: Path) -> torch.Tensor:
    """An embedding file's vectors (n, hidden), fp32, as A1111's ``create_embedding_from_data``.

    Raises:
        DataError: A file it cannot read, or that holds no single-term SD1.x embedding.
    """
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors alike
        raise DataError(
            f"{path}: cannot read it as an embedding ({type(err).__name__}: {err}); a .pt "
            "that needs code to load is refused: convert it to .safetensors"
        ) from None
    return _vectors(data, path)


def _vectors(data, path: Path) -> torch.Tensor:
    """The vectors of A1111's two layouts: its own (``string_to_param``), one tensor."""
    if isinstance(data, dict) and "string_to_param" in data:
        terms = data["string_to_param"]
        terms = getattr(terms, "_parameters", terms)
        if len(terms) != 1:
            raise DataError(f"{path}: the embedding holds {len(terms)} terms; A1111 reads one")
        vectors = next(iter(terms.values()))
    elif isinstance(data, dict) and {"clip_g", "clip_l"} <= set(data):
        raise DataError(f"{path} is an SDXL embedding (clip_g, clip_l); fulora runs SD1.x")
    elif isinstance(data, dict) and len(data) == 1 and torch.is_tensor(next(iter(data.values()))):
        vectors = next(iter(data.values()))  # diffusers' concept, or emb_params
    else:
        raise DataError(
            f"{path} holds no embedding A1111 reads (its own training's string_to_param, or "
            "one tensor)"
        )
    vectors = vectors.detach().to(torch.float32)
    return vectors.unsqueeze(0) if vectors.dim() == 1 else vectors


def check_embedding_hashes(wanted: dict[str, str], inversions: TextualInversions | None) -> None:
    """The embeddings an A1111 text names ("TI hashes") are the files given, by their hashes.

    Raises:
        ConfigError: A named embedding not given, or a file whose hash is another.
    """
    given = {e.listed_name: e for e in inversions.by_name.values()} if inversions else {}
    for name, short in wanted.items():
        found = given.get(name)
        if found is None:
            raise ConfigError(
                f"the A1111 settings name the embedding {name!r} (TI hashes: {short}), and no "
                "embeddings file of that name is given: give it with --embeddings"
            )
        if not found.sha256.startswith(short.lower()):
            raise ConfigError(
                f"embedding {name!r}: {found.path} has the hash {found.short_hash}, and the "
                f"A1111 settings name {short}: give the file that made the image"
            )
