"""kvcake's one configuration object, on pydantic-settings.

Every setting is a field of `KvcakeConfig`. Values come, later ones winning, from the
defaults below, a YAML file (`--config FILE` or `KVCAKE_CONFIG`), environment variables
`KVCAKE_<FIELD>` and command-line flags `--<field>`; pydantic parses and checks each one,
and an unknown setting or a value that does not parse is a `ConfigError` naming it. The
README's table is generated from the same fields (`kvcake config --markdown`).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from kvcake.modes import DOCUMENT_MECHANISMS, MODES, PREFIX_MODES

ENV_PREFIX = "KVCAKE_"
_YAML_FILE: ContextVar[Path | None] = ContextVar("kvcake_yaml_file", default=None)


class ConfigError(ValueError):
    """A setting is unknown or has a value of the wrong kind."""


SCOPES = ("model", "store", "reuse", "serve")
"""What a setting is about; a subcommand shows the flags of the scopes it uses."""
CHOICES = {
    "reuse": MODES,
    "dtype": ("auto", "float32", "float16", "bfloat16"),
    "tune_scoring": ("highpass", "lowpass", "norm"),
    "blend_selection": ("deviation", "question", "probe"),
    "blend_correction": ("none", "offset"),
}
"""The values these settings may take (M: a chunk count), checked when the config is built; the
mechanisms that read them parse the same names (a test keeps the lists in step)."""


def _setting(default: Any, help: str, scope: str) -> Any:
    return Field(default, description=help, json_schema_extra={"scope": scope})


class KvcakeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", protected_namespaces=())

    model: str = _setting("smollm2-135m", "Registry name (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b), a .gguf file or a HF safetensors folder.", "model")
    device: str = _setting("auto", "torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...", "model")
    dtype: str = _setting("auto", "Compute dtype: auto (bfloat16 on CUDA and on CPUs with native bf16, AVX512-BF16 or AMX; float32 elsewhere), float32, float16, bfloat16.", "model")
    threads: int = _setting(0, "CPU threads for torch; 0 keeps torch's default (all cores).", "model")
    chunk_size: int = _setting(256, "Tokens per stored KV chunk (the unit of prefix keys and reuse).", "model")
    compute_chunk: int = _setting(
        0, "Tokens per prefill pass while other requests decode (a prefill running alone takes 2048-token passes, or this if larger); a multiple of chunk_size, 0 = chunk_size. Larger passes fill a GPU; entries stay chunk_size.", "model")
    max_tokens: int = _setting(64, "Default number of tokens to generate.", "model")
    cache_dir: str = _setting("~/.cache/kvcake", "Where converted models, downloaded packages and data sets are kept.", "model")
    store_url: str = _setting(
        "", "KV store URL (memory://, file:///dir, redis://, redis+cluster://, tiered://; see docs/store.md); empty = file store in cache_dir/kv.", "store")
    reuse: str = _setting(
        "cake", f"Reuse strategy: {', '.join(PREFIX_MODES)} or split:M for the prefix; {' or '.join(DOCUMENT_MECHANISMS)} also reuse documents.", "reuse")
    tenant: str = _setting("", "Tenant salt mixed into every cache key (requests of other tenants never hit these entries).", "reuse")
    separator: str = _setting("", "Cuts a plain prompt into documents and a query (the last part); empty = never cut.", "reuse")
    document_gap: int = _setting(
        2048, "Positions left empty between the preamble and a document whose KV is computed in isolation, so it sits as far from the instructions as in a long prompt (0 = right after).", "reuse")
    blend_ratio: float = _setting(0.15, "With reuse=blend: fraction of document tokens recomputed (0 = naive reuse, 1 = full prefill).", "reuse")
    blend_check_layers: str = _setting(
        "1", "With reuse=blend: layer(s) where tokens are selected by KV deviation; several (e.g. 1,4,8) filter gradually.", "reuse")
    blend_selection: str = _setting(
        "deviation", "With reuse=blend: how the recomputed tokens are picked: deviation (fresh vs stored V at the check layer, CacheBlend), question (the question's attention to them there) or probe (that attention over the first half of the layers, from a pass of the non-document tokens first).", "reuse")
    blend_correction: str = _setting(
        "none", "With reuse=blend or tune: none, or offset (the reused tokens' stored K/V shifted per document by the mean fresh - stored gap of an even 3% sample of its tokens, recomputed).", "reuse")
    tune_ratio: str = _setting("auto", "With reuse=tune: recompute ratio, or auto = max(tune_min_ratio, C_io / (C_io + C_comp)) from measured costs.", "reuse")
    tune_min_ratio: float = _setting(0.15, "With reuse=tune: the smallest ratio auto may pick (quality floor).", "reuse")
    tune_scoring: str = _setting("highpass", "With reuse=tune: offline token score (highpass, lowpass, norm; see docs/tune.md).", "reuse")
    load_streams: int = _setting(2, "Threads reading stored document layers at once (blend, tune).", "reuse")
    load_timeout_s: float = _setting(30.0, "Longest wait for one stored layer (blend, tune); past it the request computes instead (counted as a fallback).", "reuse")
    shutdown_grace_s: float = _setting(
        30.0, "Longest a stop (SIGTERM/SIGINT to `kvcake serve`, `Engine.close()`, interpreter exit) waits for pending store writes.", "store")
    max_documents: int = _setting(64, "Most documents one request (or one warm call) may carry; more get a 400.", "reuse")
    kv_pool_gb: float = _setting(2.0, "Memory of finished requests' KV caches kept mapped for the next ones, in GB (fresh memory costs page faults; 0 = none).", "model")
    host: str = _setting("127.0.0.1", "`kvcake serve`: address to listen on.", "serve")
    port: int = _setting(8000, "`kvcake serve`: port to listen on.", "serve")
    api_keys: str = _setting("", "`kvcake serve`: comma-separated KEY:TENANT pairs; requests need `Authorization: Bearer KEY`. Empty = no auth.", "serve")
    shared_documents: bool = _setting(False, "Documents (blend) are keyed without the tenant salt, so all tenants share one corpus.", "reuse")
    metrics_api_key: str = _setting("", "`kvcake serve`: if set, `/metrics` needs `Authorization: Bearer KEY` (its counters span every tenant). Empty = open.", "serve")
    max_queue: int = _setting(64, "`kvcake serve`: requests (and warm calls) waiting for compute before new ones get 429.", "serve")
    max_batch: int = _setting(8, "`kvcake serve`: requests generating at once (continuous batching: their decode steps share one forward); 1 = one at a time.", "serve")
    max_body_bytes: int = _setting(8_000_000, "`kvcake serve`: largest request body accepted (413 above it).", "serve")
    io_threads: int = _setting(2, "`kvcake serve`: threads loading the stored prefixes of waiting requests while another computes (0 = off).", "serve")
    prefetch_gb: float = _setting(2.0, "`kvcake serve`: most KV that waiting requests may hold preloaded, in GB.", "serve")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_explain(error)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init values) over KVCAKE_* environment over the YAML file `load_config` was given."""
        yaml_file = _YAML_FILE.get()
        if yaml_file is None:
            return init_settings, env_settings
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file)

    @model_validator(mode="after")
    def _check_ranges(self) -> KvcakeConfig:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value == "split:M" or (value not in allowed and not (name == "reuse" and re.fullmatch(r"split:\d+", value))):
                raise ConfigError(f"setting {name!r} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("chunk_size", "max_tokens", "max_queue", "max_batch", "max_body_bytes", "max_documents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("blend_ratio", "tune_min_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"setting {name!r} must lie in [0, 1], got {getattr(self, name)}")
        if self.tune_ratio != "auto" and not _is_ratio(self.tune_ratio):
            raise ConfigError(f"setting 'tune_ratio' must be auto or a number in [0, 1], got {self.tune_ratio!r}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"setting 'shutdown_grace_s' must be >= 0, got {self.shutdown_grace_s}")
        if self.load_timeout_s <= 0:
            raise ConfigError(f"setting 'load_timeout_s' must be > 0, got {self.load_timeout_s}")
        if self.load_streams < 1:
            raise ConfigError(f"setting 'load_streams' must be >= 1, got {self.load_streams}")
        if self.compute_chunk < 0 or self.compute_chunk % self.chunk_size:
            raise ConfigError(f"setting 'compute_chunk' must be 0 or a multiple of chunk_size ({self.chunk_size}), got {self.compute_chunk}")
        if self.kv_pool_gb < 0:
            raise ConfigError(f"setting 'kv_pool_gb' must be >= 0, got {self.kv_pool_gb}")
        for name in ("threads", "io_threads", "document_gap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"setting {name!r} must be >= 0, got {getattr(self, name)}")
        return self

    @property
    def prefill_chunk(self) -> int:
        """Tokens per prefill pass: `compute_chunk`, or `chunk_size` when it is 0."""
        return self.compute_chunk or self.chunk_size

    def tenants_by_key(self) -> dict[str, str]:
        """API key -> tenant, from `api_keys`."""
        pairs = [item.strip() for item in self.api_keys.split(",") if item.strip()]
        if any(":" not in pair for pair in pairs):
            raise ConfigError("setting 'api_keys' must be comma-separated KEY:TENANT pairs")
        return dict(pair.split(":", 1) for pair in pairs)

    def effective_store_url(self) -> str:
        return self.store_url or f"file://{self.cache_path() / 'kv'}?max_gb=20"

    def cache_path(self) -> Path:
        path = Path(self.cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def replace(self, **changes: Any) -> KvcakeConfig:
        """A copy with `changes`, checked like any other source."""
        return type(self)(**{**self.model_dump(), **changes})


def _is_ratio(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


def _explain(error: ValidationError) -> str:
    """pydantic's errors as one line per setting, naming it."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown setting {name!r}; known: {', '.join(KvcakeConfig.model_fields)}")
        elif item["type"] == "value_error":
            lines.append(str(item["ctx"]["error"]) if "ctx" in item else item["msg"])
        else:
            lines.append(f"setting {name!r}: cannot read {item['input']!r}: {item['msg']}")
    return "; ".join(lines)


def load_config(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> KvcakeConfig:
    """Defaults < YAML file < KVCAKE_* environment < explicit overrides (CLI flags)."""
    path = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
    if path and not Path(path).expanduser().is_file():
        raise ConfigError(f"settings file {path} does not exist")
    token = _YAML_FILE.set(Path(path).expanduser() if path else None)
    try:
        return KvcakeConfig(**{name.replace("-", "_"): value for name, value in (overrides or {}).items() if value is not None})
    finally:
        _YAML_FILE.reset(token)


def add_config_flags(parser: argparse.ArgumentParser, scopes: Sequence[str] = SCOPES) -> None:
    """One `--flag` per setting of `scopes`; unset flags stay None so lower-priority sources show through.

    Settings of other scopes are still read from the YAML file and the environment.
    """
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown setting scopes {sorted(unknown)}; use {', '.join(SCOPES)}")
    group = parser.add_argument_group("settings (also KVCAKE_* env and YAML; see README)")
    group.add_argument("--config", dest="config_file", default=None, help="YAML file of settings.")
    for name, item in KvcakeConfig.model_fields.items():
        if item.json_schema_extra["scope"] not in scopes:
            continue
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, default=None, help=f"{item.description} (default: {item.default})".replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> KvcakeConfig:
    overrides = {name: getattr(args, name, None) for name in KvcakeConfig.model_fields}
    return load_config(getattr(args, "config_file", None), overrides)


def markdown_table() -> str:
    rows = ["| setting | flag | env | default | meaning |", "|---|---|---|---|---|"]
    for name, item in KvcakeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        rows.append(f"| `{name}` | `{flag}` | `{ENV_PREFIX}{name.upper()}` | `{item.default}` | {item.description} |")
    return "\n".join(rows)
