"""Step caching: skip transformer evaluations whose result can be predicted from earlier steps.

A family's `predict` sends every transformer forward through a `StepCache`:

    cache.begin_step(i, model)          once per step, before the guidance passes
    out = cache(model, x, t, context)   instead of model(x, t, context)

The model needs the three-part forward `embed(x, t, context) -> state` (with `state.hidden`, the residual
stream the output is read from), `run_blocks(state, start=0, stop=None) -> state` and `unembed(state) ->
output`; nothing else about it is known here, so any family whose transformer is split this way gets every
method (Wan, HunyuanVideo, Mochi). A transformer that takes its conditioning as several arguments is seen
through `ContextArgs` (context = the tuple of those arguments).

The decision is made once per step, on the conditional pass (the first call of the step, or row 0 of a
batched call), and the unconditional pass follows it, so batched and sequential guidance give the same
result. Each pass (branch) keeps its own cached tensors. A change of model (the A14B expert switch) clears
the state: the first step of each expert always computes.

Methods (`--cache NAME[:THRESHOLD]`):
    easycache   calibration-free (EasyCache): the whole model is bypassed while the accumulated predicted
                output change k·|Δx|/|out| stays under the threshold; k = |Δout|/|Δx| between the last two
                computed steps; reuse is x + (out − x) of the last computed step. 10 warm-up steps, the last
                step computes. Default threshold 0.05 (published).
    fbcache     calibration-free (first-block cache): block 0 always runs; when its residual differs from the
                last computed step's by less than the threshold (relative mean absolute difference), the
                other blocks are skipped and their stored residual is added (a reused step still runs embed,
                block 0 and the head, and is not counted in transformer_evals). Default 0.05 (diffusers').
    magcache    published coefficients (MagCache): the per-step magnitude ratios calibrated for the model
                (Wan 2.2 lists, verbatim) are multiplied up; the blocks are skipped while the summed
                |1 − ratio product| stays under the threshold and at most K steps in a row; the first R of
                each expert's steps compute. Needs a ratio table for the model (only the Wan 2.2 models have
                one; others are refused before any weights are read). Default threshold: the published
                setting of the model (0.06 for the Wan 2.2 A14B models and TI2V-5B).
    taylorseer  forecasting (TaylorSeer, arXiv 2503.06923; the rule of diffusers' `TaylorSeerCacheConfig`,
                hooks/taylorseer_cache.py): the first `disable_cache_before_step` steps of each expert compute,
                then one step in `cache_interval` computes (step s computes when (s − before − 1) is a multiple
                of the interval) and, from `disable_cache_after_step` on, every step computes. Each computed
                step updates, per branch, the output's divided differences up to `max_order` (stored in
                `taylor_factors_dtype`); a forecast step skips the whole transformer and returns their Taylor
                series at the step's distance from the last computed one. Options `taylorseer:KEY=VALUE,...`
                with diffusers' field names and defaults, except `use_lite_mode`, which is on (see
                `TaylorSeerConfig`); a model whose release publishes a TaylorSeer schedule of its own (its
                registry entry's `extra["cache_settings"]["taylorseer"]`) starts from that one instead, and the
                keys given override it.
Threshold 0 never skips, so it reproduces the uncached run exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import mlx.core as mx
import numpy as np

from ..errors import MlxVideoError

@dataclass(frozen=True)
class MagTable:
    """A model's published MagCache calibration and setting (threshold E, max consecutive skips K, retention R)."""

    ratios: tuple  # interleaved cond/uncond, without the prepended [1.0, 1.0]
    threshold: float
    max_skips: int
    retention: float
    retain_first_expert: bool = False  # I2V-A14B: the whole high-noise phase computes


def mag_tables() -> dict[str, MagTable]:
    """Every family's published tables, keyed by registry model id (a table for the image mode of a model is
    keyed "<id>:image"); a family lists its own (`Family.mag_tables`)."""
    from ..families import FAMILIES, optional_table

    tables: dict[str, MagTable] = {}
    for name in FAMILIES:
        tables.update(optional_table(name, "mag_tables") or {})
    return tables


DEFAULT_THRESHOLDS = {"easycache": 0.05, "fbcache": 0.05, "magcache": None}  # None: the model's published one
METHODS = (*DEFAULT_THRESHOLDS, "taylorseer")
EASYCACHE_WARMUP = 10
FACTOR_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class TaylorSeerConfig:
    """`--cache taylorseer:KEY=VALUE,...`: diffusers' `TaylorSeerCacheConfig` fields, meanings and defaults.

    One difference: `use_lite_mode` defaults to True. diffusers' default (False) forecasts only the modules its
    name patterns select (`^blocks.*attn`, `^transformer_blocks.*attn`, ... with `re.fullmatch`), and none of
    Wan's or Mochi's modules match them (their attentions are `attn1` / `attn2`), so `--cache taylorseer` with
    diffusers' default would change nothing on two of our three families. Lite mode skips every block on a
    forecast step and forecasts the output projection; everything after that projection is a reshape, so it
    is the same as forecasting the transformer's output, which is what we do (the embeddings, which diffusers
    still runs on a forecast step, are skipped too: nothing reads them). `use_lite_mode=false` and the
    module-name patterns (`skip_predict_identifiers`, `cache_identifiers`, which name diffusers' modules) are
    refused.
    """

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: str = "bfloat16"
    use_lite_mode: bool = True

    def computes(self, step: int) -> bool:
        """Whether step `step` (counted from the expert's first step) runs the transformer."""
        if step < self.disable_cache_before_step:
            return True
        if self.disable_cache_after_step is not None and step >= self.disable_cache_after_step:
            return True
        return (step - self.disable_cache_before_step - 1) % self.cache_interval == 0

    def to_dict(self) -> dict:
        return asdict(self)


TAYLORSEER_KEYS = tuple(f.name for f in fields(TaylorSeerConfig))
_REFUSED_KEYS = {
    "skip_predict_identifiers": "it selects diffusers' modules by name; mlxvid forecasts the transformer's output",
    "cache_identifiers": "it selects diffusers' modules by name; mlxvid forecasts the transformer's output",
}


def _config_value(text: str, key: str, value: str):
    """One `KEY=VALUE` of `--cache taylorseer:...`, checked; raises MlxVideoError naming what is expected."""
    def bad(expected: str):
        return MlxVideoError(f"--cache {text}: {key}={value!r} is not valid; {key} must be {expected}")

    if key == "taylor_factors_dtype":
        name = value.removeprefix("torch.")
        if name not in FACTOR_DTYPES:
            raise bad(f"one of {', '.join(FACTOR_DTYPES)}")
        return name
    if key == "use_lite_mode":
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            raise MlxVideoError(f"--cache {text}: use_lite_mode=false (diffusers' per-module forecasting, selected by "
                                "diffusers' module names) is not implemented; mlxvid's TaylorSeer is lite mode")
        raise bad("true or false")
    if key == "disable_cache_after_step" and value.lower() == "none":
        return None
    lowest = {"cache_interval": 1, "disable_cache_before_step": 1, "max_order": 0, "disable_cache_after_step": 0}[key]
    try:
        number = int(value)
    except ValueError:
        raise bad(f"an integer >= {lowest}") from None
    if number < lowest:
        why = " (the first step must compute: there is nothing to forecast from)" if key.startswith("disable") else ""
        raise bad(f"an integer >= {lowest}{why}")
    return number


def published_taylorseer(model_id: str | None) -> dict:
    """The TaylorSeer fields a model's release publishes as its own cache setting (the registry entry's
    `extra["cache_settings"]["taylorseer"]`); {} for a model without one, or an id that is not registered."""
    from ..registry import MODELS

    spec = MODELS.get(model_id) if model_id is not None else None
    return dict(spec.extra.get("cache_settings", {}).get("taylorseer", {})) if spec is not None else {}


def parse_taylorseer(text: str, options: str, defaults: dict | None = None) -> TaylorSeerConfig:
    """`KEY=VALUE,...` (the part after `taylorseer:`) -> TaylorSeerConfig over `defaults` (a model's published
    fields; TaylorSeerConfig's own for the others); unknown keys and bad values are refused with the valid keys
    named."""
    values = dict(defaults or {})
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, eq, value = (p.strip() for p in item.partition("="))
        if key in _REFUSED_KEYS:
            raise MlxVideoError(f"--cache {text}: {key} is not supported ({_REFUSED_KEYS[key]}); valid keys: "
                                f"{', '.join(TAYLORSEER_KEYS)}")
        if key not in TAYLORSEER_KEYS or not eq:
            raise MlxVideoError(f"--cache {text}: {item!r} is not KEY=VALUE with a known key; valid keys: "
                                f"{', '.join(TAYLORSEER_KEYS)}")
        values[key] = _config_value(text, key, value)
    return TaylorSeerConfig(**values)


def taylorseer_evaluations(num_steps: int, **config) -> int:
    """Transformer evaluations of a run of `num_steps` steps of one model (one guidance branch) under TaylorSeer
    with `config` (TaylorSeerConfig fields; our defaults for those not given). A CFG run makes twice as many;
    a run over two experts is the sum over each expert's steps (each expert starts afresh).

    Counted in closed form: the warm-up steps, the steps from `disable_cache_after_step` on, and between them
    the steps b+1, b+1+k, b+1+2k, ... (b = disable_cache_before_step, k = cache_interval; b, b+1, ... for
    k = 1)."""
    c = TaylorSeerConfig(**config)
    if num_steps < 0 or c.cache_interval < 1 or c.disable_cache_before_step < 1:
        raise ValueError(f"taylorseer_evaluations needs num_steps >= 0, cache_interval >= 1 and "
                         f"disable_cache_before_step >= 1; got {num_steps}, {c.cache_interval}, "
                         f"{c.disable_cache_before_step}")
    warm = min(c.disable_cache_before_step, num_steps)
    end = num_steps if c.disable_cache_after_step is None else max(warm, min(c.disable_cache_after_step, num_steps))
    first = c.disable_cache_before_step + 1 % c.cache_interval  # the first computed step after the warm-up
    middle = 0 if end <= first else (end - first - 1) // c.cache_interval + 1
    return warm + middle + (num_steps - end)


def parse_cache(text: str | None, model_id: str | None = None) -> tuple[str, float | TaylorSeerConfig] | None:
    """`NAME[:THRESHOLD]` -> (name, threshold), `taylorseer[:KEY=VALUE,...]` -> ("taylorseer", TaylorSeerConfig);
    raises MlxVideoError for an unknown name, key or a bad value."""
    if text is None or text in ("", "none", "off"):
        return None
    name, _, value = text.partition(":")
    if name == "taylorseer":
        return name, parse_taylorseer(text, value, published_taylorseer(model_id))
    if name not in DEFAULT_THRESHOLDS:
        raise MlxVideoError(f"--cache {text}: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    tables = mag_tables()
    if name == "magcache" and model_id is not None and model_id not in tables:
        raise MlxVideoError(f"--cache magcache needs published magnitude ratios for the model; {model_id} has none "
                            f"(tables: {', '.join(tables)}); use easycache or fbcache")
    if value:
        try:
            threshold = float(value)
        except ValueError:
            raise MlxVideoError(f"--cache {text}: the threshold after ':' must be a number, not {value!r}") from None
        if not np.isfinite(threshold) or threshold < 0:
            raise MlxVideoError(f"--cache {text}: the threshold must be a finite number >= 0")
    else:
        threshold = DEFAULT_THRESHOLDS[name]
        if threshold is None:
            threshold = tables[model_id].threshold if model_id in tables else 0.06
    return name, threshold


def nearest_interp(values, length: int) -> np.ndarray:
    """Nearest-neighbour resampling of a per-step list to `length` steps (indices round(i·(n−1)/(length−1)))."""
    values = np.asarray(values, dtype=np.float64)
    if length == 1:
        return values[-1:]
    idx = np.round(np.arange(length) * (len(values) - 1) / (length - 1)).astype(int)
    return values[idx]


def mag_ratios_per_step(table: MagTable, steps: int) -> np.ndarray:
    """The conditional branch's ratio for each of `steps` steps: [1.0] + the table's even entries, resampled."""
    cond = np.concatenate([[1.0], np.asarray(table.ratios[0::2], dtype=np.float64)])
    return cond if len(cond) == steps else nearest_interp(cond, steps)


def _mean_abs(a: mx.array) -> mx.array:
    return mx.mean(mx.abs(a.astype(mx.float32)))


class StepCache:
    """Counts transformer evaluations and, with a method, reuses earlier results (see the module docstring).

    `segments`: for each step, which model runs (a name); a change starts a new segment with fresh state.
    """

    def __init__(self, method: str | None, threshold: float | None = 0.0, steps: int = 1, segments=None,
                 mag_table: MagTable | None = None, taylorseer: TaylorSeerConfig | None = None):
        self.name, self.threshold, self.steps = method, threshold, steps
        self.taylorseer = taylorseer if method == "taylorseer" else None
        if method == "taylorseer" and taylorseer is None:
            self.taylorseer = TaylorSeerConfig()
        self.segments = list(segments) if segments is not None else [None] * steps
        if method == "magcache":
            if mag_table is None:
                raise MlxVideoError("magcache needs the model's magnitude-ratio table")
            self.mag_table = mag_table
            self.ratios = mag_ratios_per_step(mag_table, steps)
        self.evals = 0  # full evaluations that ran (one per sample: a batched CFG call counts 2)
        self.evals_uncached = 0
        self.reused_steps: list[int] = []  # steps whose evaluation was reused (easycache, fbcache, magcache)
        self.forecast_steps: list[int] = []  # steps whose output was forecast (taylorseer)
        self.step, self.model, self.reuse = -1, None, False
        self._calls = 0
        self._reset()

    # ---- bookkeeping ----

    def _reset(self) -> None:
        self.branch: dict[int, dict] = {}
        self.prev_x = None  # easycache
        self.k = None
        self.acc = 0.0
        self.acc_ratio, self.acc_steps = 1.0, 0  # magcache
        self.segment_start = self.step if self.step >= 0 else 0

    def begin_step(self, i: int, model) -> None:
        if model is not self.model:
            self.model = model
            self.step = i
            self._reset()
        self.step, self._calls, self.reuse = i, 0, False

    def stats(self) -> dict:
        return {"cache": self.name, "cache_threshold": self.threshold if self.name else None,
                "cache_config": self.taylorseer.to_dict() if self.taylorseer else None,
                "transformer_evals": self.evals, "transformer_evals_uncached": self.evals_uncached,
                "reused_steps": list(self.reused_steps), "forecast_steps": list(self.forecast_steps)}

    def _segment_length(self) -> int:
        label = self.segments[self.segment_start]
        n = 0
        for name in self.segments[self.segment_start:]:
            if name != label:
                break
            n += 1
        return n

    # ---- the forward ----

    def __call__(self, model, x: mx.array, t: mx.array, context) -> mx.array:
        branch = self._calls
        self._calls += 1
        self.evals_uncached += x.shape[0]
        if self.name is None:
            self.evals += x.shape[0]
            return model(x, t, context)
        first = branch == 0
        if self.name == "easycache":
            out = self._easycache(model, x, t, context, branch, first)
        elif self.name == "magcache":
            out = self._magcache(model, x, t, context, branch, first)
        elif self.name == "taylorseer":
            out = self._taylorseer(model, x, t, context, branch, first)
        else:
            out = self._fbcache(model, x, t, context, branch, first)
        if first and self.reuse:
            (self.forecast_steps if self.name == "taylorseer" else self.reused_steps).append(self.step)
        return out

    def _full(self, model, x, t, context, branch):
        """Run embed, the blocks and unembed; keep the blocks' residual for this branch."""
        state = model.embed(x, t, context)
        before = state.hidden
        state = model.run_blocks(state)
        self.branch.setdefault(branch, {})["residual"] = state.hidden - before
        self.evals += x.shape[0]
        return model.unembed(state)

    # EasyCache: decide on the first call of the step from the raw input's change.
    def _easycache(self, model, x, t, context, branch, first):
        if first:
            x0 = x[:1]
            last = self.branch.get(0)
            forced = (self.step - self.segment_start < EASYCACHE_WARMUP or self.step == self.steps - 1
                      or last is None or self.k is None or self.threshold <= 0)
            self.reuse = False
            if not forced:
                self.acc += self.k * (_mean_abs(x0 - self.prev_x) / _mean_abs(last["out"][:1])).item()
                self.reuse = self.acc < self.threshold
            if not self.reuse:
                self.acc = 0.0
            self.prev_x = x0
        store = self.branch.setdefault(branch, {})
        if self.reuse and "delta" in store:
            return x[..., : store["delta"].shape[-1]] + store["delta"]
        out = model(x, t, context)
        self.evals += x.shape[0]
        xin = x[..., : out.shape[-1]].astype(mx.float32)
        if first and "out" in store:
            self.k = (_mean_abs(out[:1] - store["out"][:1]) / _mean_abs(xin[:1] - store["x"][:1])).item()
        store.update(out=out, x=xin, delta=out.astype(mx.float32) - xin)
        return out

    # MagCache: the decision needs only the published ratios (no host synchronisation).
    def _magcache(self, model, x, t, context, branch, first):
        if first:
            table = self.mag_table
            seg_step = self.step - self.segment_start
            retained = int(self._segment_length() * table.retention)
            if table.retain_first_expert and self.segment_start == 0 and len(set(self.segments)) > 1:
                retained = self._segment_length()
            self.reuse = False
            if seg_step >= retained and self.threshold > 0 and 0 in self.branch:
                self.acc_ratio *= float(self.ratios[self.step])
                self.acc_steps += 1
                self.acc += abs(1.0 - self.acc_ratio)
                self.reuse = self.acc < self.threshold and self.acc_steps <= table.max_skips
            if not self.reuse:
                self.acc, self.acc_steps, self.acc_ratio = 0.0, 0, 1.0
        store = self.branch.get(branch)
        if self.reuse and store is not None:
            state = model.embed(x, t, context)
            state.hidden = state.hidden + store["residual"]
            return model.unembed(state)
        return self._full(model, x, t, context, branch)

    # First-block cache: block 0 runs; its residual's change decides.
    def _fbcache(self, model, x, t, context, branch, first):
        state = model.embed(x, t, context)
        before = state.hidden
        state = model.run_blocks(state, 0, 1)
        after_first = state.hidden
        r = after_first - before
        store = self.branch.setdefault(branch, {})
        if first:
            ref = store.get("r")
            self.reuse = False
            if ref is not None and self.threshold > 0 and "tail" in store:
                diff = (_mean_abs(r[:1] - ref[:1]) / _mean_abs(ref[:1])).item()
                self.reuse = diff < self.threshold
        if self.reuse and "tail" in store:
            state.hidden = after_first + store["tail"]
            return model.unembed(state)
        state = model.run_blocks(state, 1)
        store.update(r=r, tail=state.hidden - after_first)
        self.evals += x.shape[0]
        return model.unembed(state)


    # TaylorSeer: a fixed schedule of computed steps; the others are forecast from the output's differences.
    def _taylorseer(self, model, x, t, context, branch, first):
        config = self.taylorseer
        step = self.step - self.segment_start  # each expert starts afresh, as each diffusers module's state does
        if first:
            self.reuse = not config.computes(step)
        store = self.branch.setdefault(branch, {})
        if self.reuse:
            if "factors" not in store:
                raise MlxVideoError(f"taylorseer: step {self.step} is to be forecast, but nothing was computed "
                                    "before it")
            return taylor_forecast(store["factors"], step - store["step"], store["dtype"])
        out = model(x, t, context)
        self.evals += x.shape[0]
        previous = store.get("factors") if "step" in store else None
        store["factors"] = taylor_update(out, previous, step - store.get("step", step), config)
        store.update(step=step, dtype=out.dtype)
        return out


def taylor_update(out: mx.array, previous: dict | None, distance: int, config: TaylorSeerConfig) -> dict:
    """The divided differences of the output up to `config.max_order`: order 0 is `out`, order j+1 is
    (order j now − order j at the last computed step) / `distance` steps, as far as the last step has orders;
    stored in `config.taylor_factors_dtype` (differences taken in the output's dtype from the stored ones)."""
    factors = {0: out}
    if previous is not None:
        for j in range(config.max_order):
            last = previous.get(j)
            if last is None or last.shape != factors[j].shape:
                break
            factors[j + 1] = (factors[j] - last.astype(out.dtype)) / distance
    dtype = FACTOR_DTYPES[config.taylor_factors_dtype]
    return {order: f.astype(dtype) for order, f in factors.items()}


def taylor_forecast(factors: dict, offset: int, dtype) -> mx.array:
    """The Taylor series sum_j factor_j · offset^j / j! in `dtype`, `offset` steps after the last computed one."""
    out = None
    for order in range(len(factors)):
        term = factors[order].astype(dtype) * (offset**order / math.factorial(order))
        out = term if out is None else out + term
    return out


class ContextArgs:
    """`model(x, t, *context, **fixed)` seen as the cache's `model(x, t, context)`, with the same split
    forward: for a transformer that takes its conditioning as several arguments (HunyuanVideo's text, mask and
    pooled vector; Mochi's text and mask), `context` being the tuple the family's guidance batches. `fixed`:
    keyword inputs that do not change with the pass (HunyuanVideo's embedded guidance)."""

    def __init__(self, model, **fixed):
        self.model, self.fixed = model, fixed

    def __call__(self, x: mx.array, t: mx.array, context) -> mx.array:
        return self.model(x, t, *context, **self.fixed)

    def embed(self, x: mx.array, t: mx.array, context):
        return self.model.embed(x, t, *context, **self.fixed)

    def run_blocks(self, state, start: int = 0, stop: int | None = None):
        return self.model.run_blocks(state, start, stop)

    def unembed(self, state) -> mx.array:
        return self.model.unembed(state)


def make_step_cache(option: str | None, steps: int, segments=None, model_id: str | None = None,
                    image_mode: bool = False) -> StepCache:
    parsed = parse_cache(option, model_id)
    if parsed is None:
        return StepCache(None, steps=steps, segments=segments)
    name, threshold = parsed
    if name == "taylorseer":
        return StepCache(name, None, steps, segments, taylorseer=threshold)
    table = None
    if name == "magcache":
        tables = mag_tables()
        table = tables.get(f"{model_id}:image" if image_mode else model_id) or tables[model_id]
    return StepCache(name, threshold, steps, segments, table)
