"""Stand-ins: random weights of the real architecture, written where a pipeline's real weights go.

Where no hub can be reached (and no GPU is lent), a pipeline cannot be rehearsed with its real models. Random
weights of the same architecture have the same size, memory and FLOPs, so a run with them costs what the
real run will cost; only their outputs mean nothing. :func:`write_stand_ins` (``curate models stand-in
PIPELINE``) writes one for every model the pipeline loads, at the path its real weights resolve to and in the
format they come in, so that they load through the very code real weights load through:

- open_clip models: ``open_clip.create_model(architecture)`` from open_clip's own config, with the pretrained
  tag's settings (QuickGELU for OpenAI's weights), saved as the file the tag's spec names;
- LAION's NSFW and aesthetic heads, with the published layer shapes, as plain tensor state dicts (``.pth``);
- LAION's watermark detector: :func:`~curate.models.watermark.build_watermark_net`, as a state dict;
- transformers repositories: a folder laid out like the hub snapshot, from the repository's published
  ``config.json``, ``generation_config.json``, ``tokenizer_config.json`` (and ``preprocessor_config.json``,
  ``chat_template.json`` for a VLM) kept in curate under ``stand_in_configs/<org>__<name>/`` (or a folder of
  the same layout given as ``config_dirs``), and bf16 safetensors weights as the real checkpoints have.

No tokenizer files can be downloaded either, so a byte-level BPE tokenizer is synthesised with the real
vocabulary size and the real special tokens at their real ids. Its regular tokens are generated, not
learned: the 256 byte symbols, then byte pairs, then triples, letters and spaces first. English text takes
about twice as many tokens with it as with a learned vocabulary (2.2 characters a token on the default
fusion prompt): prompts cost more than the real model's, never less. A transformers CLIP (PickScore and the
LAION CLIP whose processor it uses) gets CLIP's real tokenizer instead, built from the vocabulary open_clip's
wheel ships (:func:`clip_bpe`).

Every stand-in is marked (:func:`~curate.models.weights.stand_in_marker`: ``<file>.stand-in.json`` beside a
file, ``STAND_IN.json`` inside a folder) with what it is, its architecture, parameter count, and when and by
which curate it was written; every ``*_model`` value a stand-in produces ends in " (stand-in)". Real weights
are never overwritten (``replace`` rewrites stand-ins only); ``curate models fetch`` puts the real weights in
a stand-in's place once they are downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curate.base import ModelNotFound
from curate.models.weights import WeightsSpec, is_stand_in, local_path, stand_in_marker

__all__ = [
    "CONFIGS",
    "NOTE",
    "StandInResult",
    "is_stand_in",
    "published_config",
    "read_marker",
    "write_stand_ins",
]

NOTE = "random weights of the real architecture: right size, memory and speed; its outputs mean nothing"
CONFIGS = Path(__file__).with_name("stand_in_configs")  # <org>__<name>/config.json, ... per hub repository
WRITTEN = "written"
KEPT_REAL = "kept: real weights present"
KEPT_STAND_IN = "kept: stand-in present"
_SEED = 0  # every stand-in of one architecture has the same weights, wherever it was written


@dataclass(frozen=True)
class StandInResult:
    """What :func:`write_stand_ins` did for one model."""

    stage: str
    model: str  # the weights' name, as `curate models list` shows it
    path: Path
    parameters: int | None  # None for real weights, whose count is not read
    bytes: int  # on disk, the marker included
    action: str  # "written", "kept: real weights present" or "kept: stand-in present"
    architecture: str = ""


# --- the published configs ---------------------------------------------------------------------------


def _config_folder_name(repo_id: str) -> str:
    return repo_id.replace("/", "__")


def published_config(repo_id: str) -> dict | None:
    """The ``config.json`` of hub repository ``repo_id`` as published, kept in curate; None if none is kept."""
    path = CONFIGS / _config_folder_name(repo_id) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _published_folder(spec: WeightsSpec, config_dirs: Sequence[Path]) -> Path:
    name = _config_folder_name(spec.hub_repo or "")
    for root in [*config_dirs, CONFIGS]:
        if (Path(root) / name / "config.json").is_file():
            return Path(root) / name
    raise ModelNotFound(
        f"{spec.name}: curate keeps no published config of {spec.hub_repo}, so the size of its architecture is "
        f"unknown here. Put the repository's config.json, generation_config.json and tokenizer_config.json (and "
        f"for a VLM preprocessor_config.json and chat_template.json) in {CONFIGS / name}, or in FOLDER/{name} "
        "and give --config-from FOLDER"
    )


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top; nested dicts (``vision_config``, ``rope_scaling``) are merged."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


# --- writing -----------------------------------------------------------------------------------------


def write_stand_ins(
    pipeline,
    *,
    overrides: dict[str, dict] | None = None,
    replace: bool = False,
    config_dirs: Sequence[str | os.PathLike] = (),
) -> list[StandInResult]:
    """Write a stand-in of every model ``pipeline`` (a :class:`~curate.core.pipeline.Pipeline`) loads into
    the model directory, one result per model, in the pipeline's order.

    A model whose real weights are here is kept; so is an existing stand-in unless ``replace``. ``overrides``
    (by stage name or hub id) are laid over a transformers model's published config, for a smaller model of
    the same family (tests); open_clip models and LAION's nets have fixed architectures and take none.
    ``config_dirs`` are searched before curate's own published configs (``<org>__<name>/config.json``).
    """
    from curate.models.manage import pipeline_models

    overrides = overrides or {}
    dirs = [Path(d) for d in config_dirs]
    groups = pipeline_models(pipeline)
    for group in groups:  # a model curate cannot build fails the command before anything is written
        if not _real(group):
            _builder(group[0][1], dirs)
    return [_stand_in(group, overrides, replace, dirs) for group in groups]


def _real(group: list[tuple[str, WeightsSpec]]) -> list[tuple[str, WeightsSpec]]:
    """The files of a model that are here as real weights."""
    return [
        (st, spec) for st, spec in group if local_path(spec).exists() and not is_stand_in(local_path(spec))
    ]


def _stand_in(
    group: list[tuple[str, WeightsSpec]], overrides: dict[str, dict], replace: bool, config_dirs: list[Path]
) -> StandInResult:
    here = [(st, spec) for st, spec in group if local_path(spec).exists()]
    real = _real(group)
    if real:
        st, spec = real[0]
        return StandInResult(st, spec.name, local_path(spec), None, _size(local_path(spec)), KEPT_REAL)
    if here and not replace:
        st, spec = here[0]
        marker = read_marker(local_path(spec))
        return StandInResult(
            st,
            spec.name,
            local_path(spec),
            marker.get("parameters"),
            _size(local_path(spec)),
            KEPT_STAND_IN,
            marker.get("architecture", ""),
        )
    st, spec = (here or group)[0]  # an existing stand-in is rewritten where it is; else the preferred file
    override = overrides.get(st) or overrides.get(spec.hub_repo or "") or {}
    builder = _builder(spec, config_dirs)
    target = local_path(spec)
    parameters, architecture = _write_atomically(
        target, spec, lambda tmp: builder(spec, tmp, override, config_dirs)
    )
    return StandInResult(st, spec.name, target, parameters, _size(target), WRITTEN, architecture)


Builder = Callable[[WeightsSpec, Path, Mapping[str, Any], list[Path]], tuple[int, str]]


def _builder(spec: WeightsSpec, config_dirs: list[Path]) -> Builder:
    """How to build ``spec``'s stand-in; :class:`ModelNotFound` when curate cannot (for a hub model: no
    published config of it)."""
    from curate.models.hub import RepoSpec
    from curate.models.watermark import LAION_WATERMARK

    if isinstance(spec, RepoSpec):
        _published_folder(spec, config_dirs)
        return _transformers_repo
    if spec.local.startswith("open_clip/"):
        return _open_clip
    if spec.local in _head_layouts():
        return _laion_head
    if spec.local == LAION_WATERMARK.local:
        return _watermark
    if spec.local in _reward_files():
        return _reward_files()[spec.local]
    raise ModelNotFound(f"{spec.name}: curate cannot write a stand-in of it (no builder for {spec.local})")


def _write_atomically(
    target: Path, spec: WeightsSpec, build: Callable[[Path], tuple[int, str]]
) -> tuple[int, str]:
    """``build`` into a temporary name beside ``target``, mark it, then rename it into place: an interrupted
    write never leaves anything at ``target``, and a stand-in there is only ever replaced whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.stand-in-tmp")
    _remove(tmp)
    try:
        parameters, architecture = build(tmp)
        info = _marker(spec, architecture, parameters)
        if tmp.is_dir():
            (tmp / "STAND_IN.json").write_text(json.dumps(info, indent=2) + "\n")
            aside = target.with_name(f".{target.name}.stand-in-old")
            _remove(aside)
            if target.exists():
                os.replace(target, aside)
            os.replace(tmp, target)
            _remove(aside)
        else:
            stand_in_marker(target).write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, target)
    finally:
        _remove(tmp)
    return parameters, architecture


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _marker(spec: WeightsSpec, architecture: str, parameters: int) -> dict[str, Any]:
    try:
        version = importlib.metadata.version("curate")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "stand_in": True,
        "what": NOTE,
        "model": spec.name,
        "real_source": spec.source,
        "architecture": architecture,
        "parameters": parameters,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "written_by": f"curate {version}",
        "replace_with": "curate models fetch PIPELINE.yaml (downloads the real weights into its place)",
    }


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The marker of the stand-in at ``path`` ({} where there is none or it does not parse)."""
    try:
        return json.loads(stand_in_marker(path).read_text())
    except (OSError, ValueError):
        return {}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    marker = stand_in_marker(path)
    return path.stat().st_size + (marker.stat().st_size if marker.exists() else 0)


def _save_state_dict(state: Mapping[str, Any], path: Path, file_name: str) -> None:
    """In the format the file name says: safetensors for ``.safetensors``, else a ``torch.save``-d plain
    dict of tensors (what ``torch.load(weights_only=True)`` reads)."""
    import torch

    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    if file_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- open_clip, LAION's heads and watermark net ------------------------------------------------------


def _open_clip(
    spec: WeightsSpec, tmp: Path, override: Mapping[str, Any], _dirs: list[Path]
) -> tuple[int, str]:
    import open_clip
    import torch

    _, arch, tag, file_name = spec.local.split("/", 3)  # open_clip/<arch>/<tag>/<file>
    quick_gelu = bool((open_clip.get_pretrained_cfg(arch, tag) or {}).get("quick_gelu", False))
    with torch.random.fork_rng(), _quiet_warnings():  # "No pretrained weights loaded": that is the point
        torch.manual_seed(_SEED)
        net = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    _save_state_dict(net.state_dict(), tmp, file_name)
    return _count(net), f"open_clip {arch}" + (" (QuickGELU, as the tag's weights)" if quick_gelu else "")


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


@functools.cache
def _head_layouts() -> dict[str, tuple[str, list[int]]]:
    """LAION's published heads by file: kind and layer widths, input first."""
    from curate.models.heads import AESTHETIC_L14, NSFW_B32, NSFW_L14

    return {
        NSFW_L14.spec.local: ("nsfw", [768, 64, 512, 256, 1]),
        NSFW_B32.spec.local: ("nsfw", [512, 32, 32, 1]),
        AESTHETIC_L14.spec.local: ("aesthetic", [768, 1024, 128, 64, 16, 1]),
    }


def _laion_head(
    spec: WeightsSpec, tmp: Path, override: Mapping[str, Any], _dirs: list[Path]
) -> tuple[int, str]:
    import torch

    from curate.models.heads import AestheticHead, NsfwHead

    kind, dims = _head_layouts()[spec.local]
    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
        if kind == "nsfw":
            # Keras' Normalization as LAION's file holds it: mean and variance of shape [1, input].
            net = NsfwHead(dims, torch.Size([1, dims[0]]), torch.Size([1, dims[0]]))
        else:
            net = AestheticHead(dims, [0, 2, 4, 6, 7])  # the dropouts sit at layers.1, .3 and .5
    _save_state_dict(net.state_dict(), tmp, spec.local)
    widths = "-".join(map(str, dims))
    return _count(net), f"LAION {kind} head {widths}"


def _watermark(
    spec: WeightsSpec, tmp: Path, override: Mapping[str, Any], _dirs: list[Path]
) -> tuple[int, str]:
    import torch

    from curate.models.watermark import build_watermark_net

    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
        net = build_watermark_net("efficientnet_b3")
    _save_state_dict(net.state_dict(), tmp, spec.local)
    return _count(net), "timm efficientnet_b3 with LAION's classifier head 1536-625-256-2"


# --- transformers repositories -----------------------------------------------------------------------

_BYTE_LEVEL_TOKENIZERS = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def _transformers_repo(
    spec: WeightsSpec, tmp: Path, override: Mapping[str, Any], config_dirs: list[Path]
) -> tuple[int, str]:
    """The published files (config with ``override``), a synthesised tokenizer, and random bf16 weights."""
    published = _published_folder(spec, config_dirs)
    config = _merged(json.loads((published / "config.json").read_text()), override)
    tmp.mkdir(parents=True)
    for f in sorted(published.iterdir()):
        if f.is_file() and f.name != "config.json":
            shutil.copyfile(f, tmp / f.name)
    _write_json(tmp / "config.json", config)
    tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
    clip = config.get("model_type") == "clip"
    if clip:  # CLIP's real vocabulary is here, in open_clip's wheel: no need to synthesise one
        write_clip_tokenizer(tmp, tokenizer_config)
    else:
        write_tokenizer(tmp, tokenizer_config, int(config.get("vocab_size") or _text(config)["vocab_size"]))
    model = _random_model(tmp)
    try:
        if not clip:  # a contrastive model generates no text
            _write_visible_text(model, tmp)
        parameters = _count(model)
        from curate.models.vlm import quiet_progress

        with quiet_progress():
            model.save_pretrained(tmp)
        architecture = type(model).__name__
    finally:
        del model
    # save_pretrained writes config.json and generation_config.json as this transformers version writes
    # them; the snapshot keeps the published ones, which every version reads.
    _write_json(tmp / "config.json", config)
    if (published / "generation_config.json").is_file():
        shutil.copyfile(published / "generation_config.json", tmp / "generation_config.json")
    _as_umask_allows(tmp)
    return parameters, f"{architecture} ({_describe(config)})"


def _as_umask_allows(folder: Path) -> None:
    """Files readable as the umask allows, as a download's are (save_pretrained writes some owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _text(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


def _describe(config: Mapping[str, Any]) -> str:
    text = _text(config)
    parts = [f"{text.get('num_hidden_layers')} layers", f"hidden {text.get('hidden_size')}"]
    vision = config.get("vision_config")
    if vision:
        depth = vision.get("depth", vision.get("num_hidden_layers"))
        parts.append(f"vision depth {depth}, width {vision.get('embed_dim', vision.get('hidden_size'))}")
    return ", ".join(parts)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _random_model(folder: Path):
    """The model of ``folder``'s config, randomly initialised (seeded) in bf16, the real checkpoints' dtype,
    which also halves the memory building it takes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from curate.models.vlm import dtype_kwargs, quiet_progress

    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "clip":  # a transformers CLIP (PickScore, LAION's CLIPs): CLIPModel
        from transformers import AutoModel as auto
    else:
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.random.fork_rng(), quiet_progress():
        torch.manual_seed(_SEED)
        return auto.from_config(config, **dtype_kwargs(torch.bfloat16)).eval()


def _write_visible_text(model, folder: Path) -> None:
    """Zero the output rows of the tokens a caption cannot show: special and unused ids, tokens of
    whitespace only, of control characters or of parts of multi-byte characters. Left as they are, random weights with tied embeddings mostly repeat the prompt's last token (a
    newline) or stop at once: empty captions, and no caption for the next stage to work on. So a stand-in
    writes visible text up to ``max_new_tokens``, which costs what the longest real answer costs."""
    import torch

    vocab = json.loads((folder / "vocab.json").read_text())
    byte_of = {s: b for b, s in _symbols_by_byte().items()}
    blank = [i for token, i in vocab.items() if not _visible(bytes(byte_of[c] for c in token))]
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[blank] = 0
        head.weight[len(vocab) :] = 0  # the added (special) tokens and the unused rows after them


def _visible(token: bytes) -> bool:
    """Printable ASCII, not only spaces: what most captions are made of (a byte of a multi-byte character
    alone decodes to a replacement character)."""
    return all(0x20 <= b < 0x7F for b in token) and not token.isspace()


def write_tokenizer(folder: str | os.PathLike, tokenizer_config: Mapping[str, Any], vocab_size: int) -> None:
    """``tokenizer.json``, ``vocab.json`` and ``merges.txt`` of a byte-level BPE tokenizer in ``folder``:
    generated regular tokens up to the first added token's id, then the added tokens of
    ``tokenizer_config`` (``added_tokens_decoder``) at their ids, special or not as they are published."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    cls = tokenizer_config.get("tokenizer_class")
    if cls not in _BYTE_LEVEL_TOKENIZERS:
        raise ModelNotFound(
            f"a stand-in tokenizer is a byte-level BPE, as Qwen's ({', '.join(_BYTE_LEVEL_TOKENIZERS)}); this "
            f"model's is {cls!r}"
        )
    added = sorted((int(i), t) for i, t in (tokenizer_config.get("added_tokens_decoder") or {}).items())
    regular = added[0][0] if added else vocab_size
    if added and added[-1][0] >= vocab_size:
        raise ModelNotFound(f"added token id {added[-1][0]} is outside the vocabulary of {vocab_size}")
    vocab, merges = _byte_level_bpe(regular)
    tok = Tokenizer(
        models.BPE(
            vocab=dict(vocab),
            merges=list(merges),
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for i, t in added:
        token = AddedToken(
            t["content"],
            single_word=t.get("single_word", False),
            lstrip=t.get("lstrip", False),
            rstrip=t.get("rstrip", False),
            normalized=t.get("normalized", False),
            special=t.get("special", True),
        )
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(t["content"]) != i:
            raise ModelNotFound(
                f"added token {t['content']!r} must have id {i}: the published ids have a gap"
            )
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


# Qwen2's pre-tokenizer: contractions, words with one leading non-letter, single digits, punctuation runs,
# newlines and spaces.
_PRETOKENIZE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


_PRINTABLE = (*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1))


def _symbols_by_byte() -> dict[int, str]:
    """GPT-2's byte-level symbols: printable bytes as themselves, the others shifted to 256 + n; in the order
    of the first 256 ids of Qwen's vocabulary."""
    others = [b for b in range(256) if b not in _PRINTABLE]
    return {b: chr(b) for b in _PRINTABLE} | {b: chr(256 + n) for n, b in enumerate(others)}


def _preferred_bytes() -> list[int]:
    """Every byte, those of English text first: space, lower and upper case letters, punctuation, digits,
    newline, then the others."""
    order = [ord(" "), *range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1)]
    order += [ord(c) for c in ".,'-:;!?()\"/"] + [*range(ord("0"), ord("9") + 1), ord("\n")]
    return order + [b for b in range(256) if b not in order]


@functools.cache
def _byte_level_bpe(regular: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """A vocabulary of ``regular`` tokens and its merges, deterministically: the 256 byte symbols, then every
    pair of them, then triples of the 64 preferred symbols, the most preferred first (by the least preferred
    symbol in them). Each merge joins two tokens already in the vocabulary, as a learned BPE's do."""
    symbols = _symbols_by_byte()
    preferred = [symbols[b] for b in _preferred_bytes()]
    rank = {s: i for i, s in enumerate(preferred)}

    def key(parts: tuple[str, ...]) -> tuple[int, ...]:
        ranks = [rank[p] for p in parts]
        return (max(ranks), *ranks)

    pairs = sorted(itertools.product(preferred, repeat=2), key=key)
    triples = sorted(itertools.product(preferred[:64], repeat=3), key=key)
    if not 256 <= regular <= len(symbols) + len(pairs) + len(triples):
        raise ModelNotFound(f"cannot synthesise a byte-level vocabulary of {regular} regular tokens")
    vocab = {s: i for i, s in enumerate(symbols.values())}
    merges: list[tuple[str, str]] = []
    for a, b in itertools.chain(pairs, ((a + b, c) for a, b, c in triples)):
        if len(vocab) >= regular:
            break
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    return vocab, tuple(merges)


# --- reward models: PickScore (a transformers CLIP), ImageReward (BLIP + BERT + MLP) ---------------------


@functools.cache
def clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's real byte-level BPE (vocabulary of 49,408 and its merges), built from the file open_clip ships
    (``bpe_simple_vocab_16e6.txt.gz``) as open_clip's ``SimpleTokenizer`` builds it: the ids are those of
    OpenAI's ``vocab.json``, so a stand-in CLIP tokenises as the real one does."""
    import gzip

    import open_clip.tokenizer as oc_tokenizer

    path = Path(oc_tokenizer.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    symbols = list(_symbols_by_byte().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(**kwargs):
    """transformers' ``CLIPTokenizer`` with CLIP's real vocabulary (:func:`clip_bpe`), without a download."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)


def write_clip_tokenizer(folder: Path, tokenizer_config: Mapping[str, Any]) -> None:
    """CLIP's real tokenizer files in ``folder`` (``vocab.json``, ``merges.txt``, ``tokenizer.json``), with the
    published ``tokenizer_config.json`` kept as it is."""
    keys = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")
    clip_tokenizer(**{k: tokenizer_config[k] for k in keys if k in tokenizer_config}).save_pretrained(folder)
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (folder / extra).unlink(missing_ok=True)
    _write_json(folder / "tokenizer_config.json", tokenizer_config)


@functools.cache
def _reward_files() -> dict[str, Builder]:
    """ImageReward's three files by their place in the model directory (HPS v2's checkpoint is an open_clip
    file, written by :func:`_open_clip`)."""
    from curate.models.reward import IMAGEREWARD_FILES

    return {
        IMAGEREWARD_FILES["checkpoint"].local: _imagereward_checkpoint,
        IMAGEREWARD_FILES["med_config"].local: _imagereward_med_config,
        IMAGEREWARD_FILES["vocab"].local: _bert_vocab,
    }


def _imagereward_checkpoint(
    spec: WeightsSpec, tmp: Path, override: Mapping[str, Any], _dirs: list[Path]
) -> tuple[int, str]:
    """ImageReward.pt as published: BLIP's ViT-L/16 at 224 px (timm's names), the cross-attending BERT-base of
    med_config.json and the MLP, as a plain state dict (``torch.load(weights_only=True)`` reads it)."""
    import torch
    from transformers import BlipTextModel, BlipVisionModel

    from curate.models.heads import AestheticHead
    from curate.models.reward import (
        IMAGEREWARD_MED_CONFIG,
        IMAGEREWARD_VIT,
        _blip_configs,
        imagereward_checkpoint,
    )

    vit = {**IMAGEREWARD_VIT, "intermediate": 4 * IMAGEREWARD_VIT["width"]}
    vision_cfg, text_cfg = _blip_configs(vit, IMAGEREWARD_MED_CONFIG)
    with torch.random.fork_rng(), _quiet_warnings():
        torch.manual_seed(_SEED)
        nets = (
            BlipVisionModel(vision_cfg),
            BlipTextModel(text_cfg, add_pooling_layer=False),
            AestheticHead([IMAGEREWARD_MED_CONFIG["hidden_size"], 1024, 128, 64, 16, 1], [0, 2, 4, 6, 7]),
        )
    _save_state_dict(imagereward_checkpoint(*nets), tmp, spec.local)
    return sum(
        _count(n) for n in nets
    ), "ImageReward: BLIP ViT-L/16 224 px, BERT-base with cross-attention, MLP"


def _imagereward_med_config(
    spec: WeightsSpec, tmp: Path, override: Mapping[str, Any], _dirs: list[Path]
) -> tuple[int, str]:
    from curate.models.reward import IMAGEREWARD_MED_CONFIG

    _write_json(tmp, IMAGEREWARD_MED_CONFIG)
    return 0, "ImageReward's med_config.json as published"


# bert-base-uncased's layout: [PAD] 0, [unused0..98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103,
# [unused99..993] 104-998, then the word pieces, 30,522 in all.
BERT_VOCAB_SIZE = 30522


def _bert_vocab(
    spec: WeightsSpec, tmp: Path, override: Mapping[str, Any], _dirs: list[Path]
) -> tuple[int, str]:
    """A WordPiece vocabulary with BERT's special tokens at their ids: characters, then pairs and triples of
    lower-case letters and digits, as words and as ``##`` continuations. Generated, not learned: text takes
    more tokens with it than with the real one (truncated at ImageReward's 35 tokens, as real text is)."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 994)]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars + ["##" + c for c in chars]
    alnum = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    for n in (2, 3):
        for parts in itertools.product(alnum, repeat=n):
            word = "".join(parts)
            tokens += [word, "##" + word]
            if len(tokens) >= BERT_VOCAB_SIZE:
                break
        if len(tokens) >= BERT_VOCAB_SIZE:
            break
    tmp.write_text("\n".join(tokens[:BERT_VOCAB_SIZE]) + "\n")
    return 0, f"BERT uncased WordPiece vocabulary of {BERT_VOCAB_SIZE} (generated)"
