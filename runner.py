"""The compiled slot programs and the device state every rank holds: runs one `plan.Plan` per step.

Every rank calls the same functions here in the same order; the programs are compiled (or loaded from
program_cache) once per shape bucket and reused, so a request never triggers a compile after
`SlotRunner.warm_up`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modeling_flax_opt import KVCache, OPTConfig, OPTDecoderLayer, OPTForCausalLM
from opt_utils import keep_freed_memory, model_config, resolve_dtype
from plan import SEED_WORDS, Plan, PrefillGroup, SlotShapes, split_seed
from program_cache import ProgramCache, ProgramSpec
from sharding import KV_CACHE_SPEC, make_mesh
from slots import (Admissions, SlotState, admit_state, advance_first_rows, place_prompt, retarget,
                   shift_columns, write_step)
from weights import build_model, load_weights

LOGGER = logging.getLogger("runner")

@dataclasses.dataclass
class StepOutput:
    """Device arrays of one step, read by rank 0 a step later: first tokens per group [b], then every slot's [S]."""

    first_tokens: list[jax.Array]
    tokens: jax.Array


class Network(Protocol):
    """What SlotRunner runs, stage by stage: `OPTNetwork` for OPT; the tests plug in fakes."""

    config: OPTConfig
    dtype: Any
    padded_vocab_size: int

    def split(self, params: Any) -> tuple[Any, tuple[Any, ...], Any]:
        """The parameters of the embedding stage, of each layer, and of the head."""
        ...

    def embed(self, params: Any, tokens: jax.Array, column: jax.Array, first_valid: jax.Array) -> jax.Array:
        """[B, T] tokens at columns column..column+T-1 -> [B, T, D] hidden states."""
        ...

    def layer(self, params: Any, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, column: jax.Array,
              first_valid: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One decoder layer: x and its keys and values (see `OPTForCausalLM` for the cache and window)."""
        ...

    def logits(self, params: Any, x: jax.Array) -> jax.Array:
        """[B, D] last hidden states -> [B, V_padded] float32."""
        ...


# The parameters of the stages around the layers (the ones a config has of these).
EMBED_PARAMS = ("embed_tokens", "embed_positions", "project_in")
HEAD_PARAMS = ("final_layer_norm", "project_out", "lm_head")


@dataclasses.dataclass(frozen=True)
class OPTNetwork:
    """OPT (`modeling_flax_opt`) as a `Network`: its embedding, one decoder layer, and its head."""

    model: OPTForCausalLM

    @property
    def config(self) -> OPTConfig:
        return self.model.config

    @property
    def dtype(self) -> Any:
        return self.model.dtype

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab_size

    def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...], dict[str, Any]]:
        pick = lambda names: {name: params[name] for name in names if name in params}
        layers = tuple(params[f"layers_{i}"] for i in range(self.config.num_hidden_layers))
        return pick(EMBED_PARAMS), layers, pick(HEAD_PARAMS)

    def embed(self, params: Any, tokens: jax.Array, column: jax.Array, first_valid: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, tokens, column, first_valid, method=OPTForCausalLM.embed)

    def layer(self, params: Any, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, column: jax.Array,
              first_valid: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        layer = OPTDecoderLayer(self.config, self.dtype)
        x, (k, v) = layer.apply({"params": params}, x, cache_k, cache_v, column, first_valid, window)
        return x, k, v

    def logits(self, params: Any, x: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, x, method=OPTForCausalLM.logits)


class SlotRunner:
    """The compiled slot programs and the device state they update; every rank holds one and runs each Plan.

    The network runs in stages, each its own program: the embedding, one decoder layer (compiled once
    per shape and called for every layer with that layer's parameters and cache), and the head (logits,
    the token, the slots' state). A 12-layer model compiles one layer instead of twelve for every
    shape: XLA's compile time grows with the program, and start-up compiles about 50 shapes. Calling
    a program per layer costs the host about 30 us each, against a step of tens of milliseconds.

    Programs are compiled ahead of time by `warm_up` for every shape in `shapes` (or loaded from the
    `ProgramCache`) and then only looked up; a plan needing any other shape is an error, never a compile.
    """

    def __init__(self, *, model: OPTForCausalLM | Network, params: Any, mesh: Mesh, shapes: SlotShapes,
                 programs: ProgramCache | None = None):
        self.net: Network = OPTNetwork(model) if isinstance(model, OPTForCausalLM) else model
        self.mesh = mesh
        self.shapes = shapes
        self.config = self.net.config
        self.params = params
        self.cache_store = programs or ProgramCache.in_memory(mesh)
        self._programs: dict[tuple[Any, ...], Any] = {}
        self._replicated = NamedSharding(mesh, P())
        self._local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self._cache_sharding = NamedSharding(mesh, KV_CACHE_SPEC)
        self.cache: KVCache | None = None
        self.state: SlotState | None = None
        self.column = 0  # host copy of state.column

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        self._params = params
        self.embed_params, self.layer_params, self.head_params = self.net.split(params)

    # -- the stages ------------------------------------------------------------------------------
    def _logits(self, params: Any, x: jax.Array) -> jax.Array:
        return self.net.logits(params, x[:, -1])

    # -- abstract arguments ------------------------------------------------------------------------
    def _spec(self, tree: Any, sharding: NamedSharding | None = None) -> Any:
        """Abstract arrays of `tree` (a function's result shapes) with `sharding` (default replicated)."""
        sharding = sharding or self._replicated
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

    def _array(self, shape: tuple[int, ...], dtype: Any, sharding: NamedSharding | None = None) -> Any:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or self._replicated)

    def _columns(self, rows: int, columns: int) -> Any:
        """One layer's cache of rows x columns, split over heads."""
        cfg = self.config
        return self._array((rows, cfg.num_attention_heads, columns, cfg.head_dim), self.net.dtype,
                           self._cache_sharding)

    def _cache_spec(self, rows: int, columns: int) -> KVCache:
        layers = range(self.config.num_hidden_layers)
        return KVCache(k=tuple(self._columns(rows, columns) for _ in layers),
                       v=tuple(self._columns(rows, columns) for _ in layers))

    def _hidden(self, rows: int, tokens: int) -> Any:
        return self._array((rows, tokens, self.config.hidden_size), self.net.dtype)

    def _state_spec(self) -> SlotState:
        return self._spec(jax.eval_shape(lambda: SlotState.empty(self.shapes.slots, 0)))

    def _params_spec(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    @staticmethod
    def _shardings(spec_tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda a: a.sharding, spec_tree)

    # -- the programs --------------------------------------------------------------------------------
    def program_specs(self) -> list[ProgramSpec]:
        """Every program a plan can need, for the shapes in `self.shapes`."""
        sh = self.shapes
        specs = self._slot_specs()
        for rows in sh.decode_rows:
            specs += self._decode_specs(rows)
        for rows in sorted({b for b, _ in sh.prefill_shapes()}):
            specs += self._prefill_row_specs(rows)
        for rows, bucket in sh.prefill_shapes():
            specs += self._prefill_bucket_specs(rows, bucket)
        return specs

    def _slot_specs(self) -> list[ProgramSpec]:
        cfg, dtype, S, C = self.config, self.net.dtype, self.shapes.slots, self.shapes.columns
        cache, state, scalar = self._cache_spec(S, C), self._state_spec(), self._array((), jnp.int32)
        outs = (self._shardings(cache), self._shardings(state))
        specs = [
            ProgramSpec(("alloc",), lambda: (KVCache.zeros(cfg, S, C, dtype), SlotState.empty(S, 0)), (), outs),
            ProgramSpec(("shift",), shift_columns, (cache, state, scalar), outs, donate=(0, 1)),
            ProgramSpec(("retarget",), retarget, (state, scalar), outs[1], donate=(0,)),
        ]
        for rows in self.shapes.decode_rows:
            specs.append(ProgramSpec(("write", rows), write_step, (cache, self._cache_spec(rows, 1), scalar),
                                     outs[0], donate=(0,)))
        return specs

    def _decode_specs(self, rows: int) -> list[ProgramSpec]:
        """A decode step over slots 0..rows-1: embed, a layer per window, then the head (greedy or sampling)."""
        S, C, eos = self.shapes.slots, self.shapes.columns, self.config.eos_token_id
        tokens, scalar = self._array((S,), jnp.int32), self._array((), jnp.int32)
        x, state, new = self._hidden(rows, 1), self._state_spec(), self._columns(rows, 1)
        embed = lambda p, tok, column, fv: self.net.embed(p, tok[:rows, None], column, fv[:rows])
        specs = [ProgramSpec(("decode_embed", rows), embed, (self._params_spec(self.embed_params), tokens, scalar,
                                                            tokens), x.sharding)]
        for window in self.shapes.windows:
            layer = lambda p, x, ck, cv, column, fv, window=window: self.net.layer(
                p, x, ck[:rows], cv[:rows], column, fv[:rows], window)
            specs.append(ProgramSpec(
                ("decode_layer", window, rows), layer,
                (self._params_spec(self.layer_params[0]), x, self._columns(S, C), self._columns(S, C), scalar, tokens),
                (x.sharding, new.sharding, new.sharding)))
        for sampling in (False, True):
            # The new tokens also come out on their own: the state is donated to the next step before
            # rank 0 reads them.
            def head(p: Any, x: jax.Array, state: SlotState, sampling: bool = sampling) -> tuple[SlotState, jax.Array]:
                state = advance_first_rows(state, self._logits(p, x), eos, sampling)
                return state, state.tokens

            specs.append(ProgramSpec(("decode_head", rows, sampling), head,
                                     (self._params_spec(self.head_params), x, state),
                                     (self._shardings(state), self._replicated), donate=(2,)))
        return specs

    def _admissions_spec(self, rows: int) -> Admissions:
        vec = lambda dtype, *tail: self._array((rows, *tail), dtype)
        return Admissions(slot=vec(jnp.int32), length=vec(jnp.int32), budget=vec(jnp.int32),
                          temperature=vec(jnp.float32), top_k=vec(jnp.int32), top_p=vec(jnp.float32),
                          seed=vec(jnp.uint32, SEED_WORDS), ignore_eos=vec(bool), valid=vec(bool))

    def _prefill_row_specs(self, rows: int) -> list[ProgramSpec]:
        """The stages of a prefill of `rows` prompts that do not depend on the prompt bucket."""
        chunk, eos = self.shapes.chunk, self.config.eos_token_id
        vec, scalar, x = self._array((rows,), jnp.int32), self._array((), jnp.int32), self._hidden(rows, chunk)
        logits = self._array((rows, self.net.padded_vocab_size), jnp.float32)
        state = self._state_spec()
        # `after` (unused, kept) orders the embedding's collective after every collective before it: the
        # newest state's column for a prompt's first chunk (the step before is done), the last layer's
        # output for the next chunks. Independent programs may otherwise run at once, in a different
        # order on each rank, and two ranks each in another program's collective fail or never return
        # (gloo: "op.preamble.length <= op.nbytes").
        embed = lambda p, tokens, column, fv, after: self.net.embed(p, tokens, column, fv)
        inputs = (self._params_spec(self.embed_params), self._array((rows, chunk), jnp.int32), scalar, vec)
        specs = [
            ProgramSpec(("prefill_embed", rows), embed, (*inputs, scalar), x.sharding, keep_unused=True),
            ProgramSpec(("prefill_embed_next", rows), embed, (*inputs, x), x.sharding, keep_unused=True),
            ProgramSpec(("prefill_logits", rows), self._logits, (self._params_spec(self.head_params), x),
                        self._replicated),
        ]
        for sampling in (False, True):
            start = lambda state, lg, adm, sampling=sampling: admit_state(state, lg, adm, eos, sampling)
            specs.append(ProgramSpec(("admit", rows, sampling), start, (state, logits, self._admissions_spec(rows)),
                                     (self._shardings(state), self._replicated), donate=(0,)))
        return specs

    def _prefill_bucket_specs(self, rows: int, bucket: int) -> list[ProgramSpec]:
        """The stages of a prefill of `rows` prompts left-padded to `bucket` columns."""
        cfg, dtype, S, C, chunk = self.config, self.net.dtype, self.shapes.slots, self.shapes.columns, self.shapes.chunk
        prompts, layer_cache = self._cache_spec(rows, bucket), self._columns(rows, bucket)
        vec, scalar, x = self._array((rows,), jnp.int32), self._array((), jnp.int32), self._hidden(rows, chunk)
        layer = lambda p, x, pk, pv, column, fv: self.net.layer(p, x, pk, pv, column, fv, None)
        return [
            ProgramSpec(("prompts", rows, bucket), lambda: KVCache.zeros(cfg, rows, bucket, dtype), (),
                        self._shardings(prompts)),
            ProgramSpec(("prefill_layer", rows, bucket), layer,
                        (self._params_spec(self.layer_params[0]), x, layer_cache, layer_cache, scalar, vec),
                        (x.sharding, layer_cache.sharding, layer_cache.sharding), donate=(2, 3)),
            ProgramSpec(("place", rows, bucket), place_prompt,
                        (self._columns(S, C), layer_cache, vec, self._array((rows,), bool), scalar),
                        self._cache_sharding, donate=(0,)),
        ]

    def _build(self, spec: ProgramSpec) -> None:
        self._programs[spec.key] = self.cache_store.build(spec)

    def warm_up(self, checkpoint: Callable[[], None] | None = None) -> float:
        """Loads or compiles every program, then allocates the slots. Returns seconds.

        `checkpoint`, when given, runs on this thread after each program is built; what it raises abandons
        the rest (the server's stops on a signal).

        Programs build in parallel threads: XLA compiles and loads without holding the GIL.
        XLA's default optimisation level everywhere: on the CPU, LLVM's level 1 halved compile time but made
        the decode step 1.25x slower and its in-place cache write a copy of the whole cache (random/125M
        float32, 16 slots: 158 instead of 29 ms per step for one row).
        """
        begin = time.perf_counter()
        specs = self.program_specs()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        try:
            for future in [pool.submit(self._build, spec) for spec in specs]:
                future.result()
                if checkpoint is not None:
                    checkpoint()
        finally:  # a signal (StopRequested) or an error: drop the builds not started yet
            pool.shutdown(wait=True, cancel_futures=True)
        self.reset()
        took = time.perf_counter() - begin
        s = self.cache_store.stats
        LOGGER.info("programs: %d ready in %.1f s for %d slots x %d columns (%d prefill shapes, %d windows x %d decode "
                    "row counts): %d loaded from the cache (%.1f s), %d compiled (tracing %.1f s, compiling %.1f s, "
                    "storing %.1f s; summed over threads)", len(specs), took, self.shapes.slots, self.shapes.columns,
                    len(self.shapes.prefill_shapes()), len(self.shapes.windows), len(self.shapes.decode_rows),
                    s.loaded, s.load_s, s.compiled, s.trace_s, s.compile_s, s.store_s)
        return took

    def _program(self, *key: Any) -> Any:
        if key not in self._programs:
            raise RuntimeError(f"no compiled program for {key}: the shape was not warmed up")
        return self._programs[key]

    def reset(self) -> None:
        """Empties every slot (a fresh cache and state)."""
        self.cache, self.state = self._program("alloc")()
        self.column = 0

    # -- running -----------------------------------------------------------------------------------
    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array, replicated on every device of the mesh, without any collective.

        `jax.device_put(x, sharding)` onto devices of several processes first checks that every process
        passed the same value: a collective outside the programs' chain of dependencies, which can meet
        a program's collective running at the same time on another rank (gloo then fails with
        "op.preamble.length <= op.nbytes"). Here each process copies `x` to its own devices only.
        """
        x = np.asarray(x)
        shards = [jax.device_put(x, device) for device in self._local_devices]
        return jax.make_array_from_single_device_arrays(x.shape, self._replicated, shards)

    def run(self, plan: Plan) -> StepOutput:
        """Dispatches the plan's programs (asynchronously); the outputs are read later by whoever needs them."""
        if plan.column != self.column:
            raise RuntimeError(f"plan for column {plan.column} but this rank is at column {self.column}")
        if plan.shift and plan.moves:
            self.cache, self.state = self._program("shift")(self.cache, self.state, self._put(np.int32(plan.shift)))
        elif plan.shift:
            self.state = self._program("retarget")(self.state, self._put(np.int32(plan.shift)))
        self.column -= plan.shift
        firsts = [self._prefill_and_admit(group) for group in plan.groups]
        tokens = self._decode(plan.window, plan.rows, plan.sampling)
        self.column += 1
        return StepOutput(firsts, tokens)

    def read(self, output: StepOutput) -> tuple[list[np.ndarray], np.ndarray]:
        """The step's tokens on the host: each prefill group's first tokens [b], then every slot's [S]."""
        firsts, tokens = jax.device_get((output.first_tokens, output.tokens))
        return [np.asarray(f) for f in firsts], np.asarray(tokens)

    def _decode(self, window: int, rows: int, sampling: bool) -> jax.Array:
        """One decode step over slots 0..rows-1; returns every slot's newest token [S]."""
        state, cache = self.state, self.cache
        x = self._program("decode_embed", rows)(self.embed_params, state.tokens, state.column, state.first_valid)
        layer = self._program("decode_layer", window, rows)
        keys, values = [], []
        for params, cache_k, cache_v in zip(self.layer_params, cache.k, cache.v):
            x, k, v = layer(params, x, cache_k, cache_v, state.column, state.first_valid)
            keys.append(k)
            values.append(v)
        self.state, tokens = self._program("decode_head", rows, sampling)(self.head_params, x, state)
        self.cache = self._program("write", rows)(cache, KVCache(k=tuple(keys), v=tuple(values)), self.state.column)
        return tokens

    def _prefill_and_admit(self, group: PrefillGroup) -> jax.Array:
        b, P, chunk = group.rows, group.prompt_bucket, self.shapes.chunk
        tokens = np.full((b, P), self.config.pad_token_id, np.int32)
        first_valid = np.full((b,), P - 1, np.int32)  # unused rows: one pad token
        for row, a in enumerate(group.admissions):
            first_valid[row] = P - len(a.request.tokens)
            tokens[row, first_valid[row] :] = a.request.tokens
        prompts = self._program("prompts", b, P)()
        keys, values = list(prompts.k), list(prompts.v)
        layer, fv = self._program("prefill_layer", b, P), self._put(first_valid)
        embed, after = self._program("prefill_embed", b), self.state.column
        # Chunks of nothing but left padding are skipped: their columns are never read.
        for column in range(int(first_valid.min()) // chunk * chunk, P, chunk):
            at = self._put(np.int32(column))
            x = embed(self.embed_params, self._put(tokens[:, column : column + chunk]), at, fv, after)
            for i, params in enumerate(self.layer_params):
                x, keys[i], values[i] = layer(params, x, keys[i], values[i], at, fv)
            embed, after = self._program("prefill_embed_next", b), x
        logits = self._program("prefill_logits", b)(self.head_params, x)
        rows = self._admissions(group)
        place = self._program("place", b, P)
        copy_in = lambda layers, prompts: tuple(place(layer, new, rows.slot, rows.valid, self.state.column)
                                                for layer, new in zip(layers, prompts))
        self.cache = KVCache(k=copy_in(self.cache.k, keys), v=copy_in(self.cache.v, values))
        self.state, first = self._program("admit", b, group.sampling)(self.state, logits, rows)
        return first

    def _admissions(self, group: PrefillGroup) -> Admissions:
        b = group.rows
        fields = {name: np.zeros((b,), dtype) for name, dtype in (
            ("slot", np.int32), ("length", np.int32), ("budget", np.int32), ("temperature", np.float32),
            ("top_k", np.int32), ("top_p", np.float32), ("ignore_eos", bool), ("valid", bool))}
        fields["top_p"][:] = 1.0
        fields["length"][:] = 1
        seed = np.zeros((b, SEED_WORDS), np.uint32)
        for row, a in enumerate(group.admissions):
            s = a.request.sampling
            values = dict(slot=a.slot, length=len(a.request.tokens), budget=a.request.max_new_tokens,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, ignore_eos=s.ignore_eos, valid=True)
            for name, value in values.items():
                fields[name][row] = value
            seed[row] = split_seed(s.seed)
        return Admissions(**{name: self._put(v) for name, v in fields.items()}, seed=self._put(seed))


@dataclasses.dataclass(frozen=True)
class Served:
    """Everything one rank needs to run plans, as `build_runner` makes it."""

    config: OPTConfig
    mesh: Mesh
    model: OPTForCausalLM
    params: Any
    runner: SlotRunner
    compile_s: float  # the warm-up's: compiling or loading every program


def build_runner(model_name: str, *, devices: Sequence[jax.Device], dtype: str = "auto", slots: int,
                 prefill_tokens: int = 4096, cache_dir: str | None = None, config: OPTConfig | None = None,
                 shapes: SlotShapes | None = None, checkpoint: Callable[[], None] | None = None) -> Served:
    """The one way to bring a model up (server, benchmarks, tests): config, mesh over `devices`, model,
    weights (sharded over every device of every rank) and the runner, every program compiled or loaded.

    `dtype`: "auto" or a name (see opt_utils.resolve_dtype); `config` and `shapes` override the model's
    own and those `slots` and `prefill_tokens` make (tests use small ones). `checkpoint`, when given, runs
    after the weights are loaded and after each program is built; what it raises abandons the rest.
    """
    keep_freed_memory()
    config = config or model_config(model_name, cache_dir)
    mesh = make_mesh(devices, config)
    platform = mesh.devices.flat[0].platform
    resolved = resolve_dtype(dtype, platform)
    LOGGER.info("parameters and computation in %s (--dtype %s on %s)", resolved.name, dtype, platform)
    model = build_model(config, dtype=resolved, mesh=mesh)
    shapes = shapes or SlotShapes.make(slots=slots, max_positions=config.max_position_embeddings,
                                       prefill_tokens=prefill_tokens)
    programs = ProgramCache.under(cache_dir, mesh=mesh, config=config, dtype=resolved, shapes=shapes)
    params = load_weights(model_name, model, mesh, cache_dir=cache_dir, programs=programs)
    if checkpoint is not None:
        checkpoint()
    runner = SlotRunner(model=model, params=params, mesh=mesh, shapes=shapes, programs=programs)
    compile_s = runner.warm_up(checkpoint)
    return Served(config, mesh, model, params, runner, compile_s)
