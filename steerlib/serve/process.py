"""Running the server: load the model and vectors, build the app, hand it to uvicorn.

``ServeOptions`` gathers what ``steerlib serve`` takes, checked before the model loads (a bad port, a NaN
steering coefficient or an unknown layer is an error at start, not after minutes of loading).
``BackgroundServer`` runs an app on a thread (tests, notebooks, the load test).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import ValidationError

from steerlib.core.arch import config_depth
from steerlib.core.checks import check_int, check_number
from steerlib.core.loading import load_vectors
from steerlib.core.vectors import TraitVectors
from steerlib.monitoring.drift import DriftMonitor
from steerlib.serve.app import AppOptions, create_app
from steerlib.serve.schema import MAX_ABS_COEF, SteeringSpec
from steerlib.steering.calibration import Calibration, calibration_path
from steerlib.vllm.layout import VllmOptions

__all__ = ["API_KEY_ENV", "ENGINES", "METRICS_KEY_ENV",
           "BackgroundServer", "ServeOptions", "default_steering_specs", "named_vectors",
           "resolve_api_key", "serve"]

log = logging.getLogger("steerlib.serve")

API_KEY_ENV = "STEERLIB_API_KEY"
METRICS_KEY_ENV = "STEERLIB_METRICS_KEY"
ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class ServeOptions:
    """What ``steerlib serve`` runs with.

    Attributes:
        model_path: local HF folder or .gguf; None = the embedded SmolLM2-135M-Instruct.
        vectors: trait name -> saved TraitVectors (folder or .safetensors file).
        steer: default steering as (layer, coef) pairs for ``steer_vector``.
        steer_vector, steer_mode, steer_positions: which vector, mode and positions the default steering uses.
        app: the HTTP and engine options (``AppOptions``; its ``default_steering`` is filled from ``steer``).
        port: where to listen (the host is ``app.host``).
        drift_*: ``DriftMonitor`` window, method, threshold and reference size (robust calibration).
        alerts_path: JSONL file the drift monitor appends alerts to.
        dtype, device: how to load the model.
        log_level: uvicorn log level.
        engine: "hf" (steerlib's continuous-batching engine on transformers) or "vllm" (vLLM with steerlib's
            plugin; the API process then holds only the model's shape, on the meta device).
        vllm_args: vLLM's engine arguments under vLLM's names (``tensor_parallel_size``, ``enforce_eager``, ...):
            a ``VllmOptions``, or a mapping turned into one (and so checked) when the options are built.
    """

    model_path: str | Path | None = None
    vectors: Mapping[str, str | Path] = field(default_factory=dict)
    steer: tuple[tuple[int, float], ...] = ()
    steer_vector: str | None = None
    steer_mode: str = "add"
    steer_positions: str = "all"
    app: AppOptions = field(default_factory=AppOptions)
    port: int = 8000
    drift_window: int = 20
    drift_method: str = "zscore"
    drift_threshold: float = 3.0
    drift_reference_size: int = 50
    alerts_path: str | Path | None = None
    dtype: str = "float32"
    device: str | None = None
    log_level: str = "info"
    engine: str = "hf"
    vllm_args: VllmOptions | Mapping[str, Any] = field(default_factory=VllmOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.vllm_args, VllmOptions):
            object.__setattr__(self, "vllm_args", VllmOptions.from_engine_args(self.vllm_args))

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad option: the one check of what ``steerlib serve`` was given,
        run before the model loads and the port binds.

        The numbers of ``app`` were checked when it was built (``AppOptions``); this reads only the model's config
        (for its depth, ``core.arch.config_depth``) and the vector files. The default steering and the presets
        are checked by building their ``SteeringSpec``s, so their modes and positions are the HTTP API's own.
        """
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {ENGINES}")
        if self.engine != "vllm" and self.vllm_args != VllmOptions():
            raise ValueError("vLLM engine arguments (--tensor-parallel-size, --enforce-eager, --vllm-arg, ...) "
                             "need --engine vllm")
        check_int(self.port, "--port", minimum=0, maximum=65535)  # 0: any free port
        for layer, coef in self.steer:
            check_number(coef, f"--steer coefficient at layer {layer}")
            if abs(coef) > MAX_ABS_COEF:
                raise ValueError(f"--steer coefficient at layer {layer} must be at most {MAX_ABS_COEF:g} in size, "
                                 f"got {coef:g}")
        DriftMonitor(["check"], window=self.drift_window, method=self.drift_method, threshold=self.drift_threshold,
                     reference_size=self.drift_reference_size)  # the monitor's own checks, on a throwaway
        for folder in self.app.vector_dirs:
            if not Path(folder).is_dir():
                raise ValueError(f"--vector-dir {folder}: not a folder")
        for name, path in self.vectors.items():
            if not Path(path).exists():
                raise ValueError(f"vector {name!r}: {path} does not exist")
        try:
            specs = default_steering_specs(self.steer, self.steer_vector, list(self.vectors), self.steer_mode,
                                           self.steer_positions)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"--steer-{first['loc'][0]}: {first['msg']}") from None
        from transformers import AutoConfig  # config only: no weights are read

        from steerlib.core.models import resolve_model_path

        n_layers = config_depth(AutoConfig.from_pretrained(resolve_model_path(self.model_path)[0]))
        if n_layers is None:
            return  # the model's layout check names what is missing when it loads
        for spec in specs:
            check_int(spec.layer, "--steer layer", maximum=n_layers)
        if self.app.monitor_layer is not None:
            check_int(self.app.monitor_layer, "--monitor-layer", maximum=n_layers)
        for name, preset in self.app.presets:
            for spec in preset:
                if spec.vector not in self.vectors:
                    raise ValueError(f"--preset {name}: no vector named {spec.vector!r} (given: "
                                     f"{sorted(self.vectors)})")
                if spec.layer is not None:
                    check_int(spec.layer, f"--preset {name} layer", maximum=n_layers)
        for name, path in self.vectors.items():
            source = load_vectors(path)
            if isinstance(source, TraitVectors) and source.n_positions != n_layers + 1:
                raise ValueError(f"{path}: vectors {name!r} cover {source.n_positions - 1} blocks but the model "
                                 f"has {n_layers}")

class BackgroundServer:
    """Run an app with uvicorn on a background thread; ``port=0`` picks a free port; ``url`` is the base URL."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="steerlib-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def named_vectors(model: torch.nn.Module, vectors: Mapping[str, str | Path | TraitVectors] | None
                  ) -> dict[str, TraitVectors]:
    """name -> TraitVectors through the one loader (any format it reads), checked against ``model``."""
    out = {}
    for name, src in (vectors or {}).items():
        tv = load_vectors(src, model)
        if not isinstance(tv, TraitVectors):
            raise ValueError(f"vector {name!r}: the server needs trait vectors with one row per layer, not a "
                             "single-direction tensor")
        out[name] = tv
    return out


def named_calibrations(model: torch.nn.Module, vectors: Mapping[str, str | Path | TraitVectors] | None
                       ) -> dict[str, Calibration]:
    """name -> the calibration saved beside that vector path (``steerlib calibrate``), where there is one."""
    out = {}
    for name, src in (vectors or {}).items():
        if isinstance(src, str | Path) and calibration_path(src).is_file():
            out[name] = Calibration.load(calibration_path(src), model)
    return out


def default_steering_specs(steer: Sequence[tuple[int, float]], steer_vector: str | None, names: Sequence[str],
                           mode: str = "add", positions: str = "all") -> list[SteeringSpec]:
    """CLI-style ``--steer LAYER:COEF`` pairs for one named vector -> specs."""
    if not steer:
        return []
    if steer_vector is None:
        if len(names) != 1:
            raise ValueError(f"say which vector to steer with (loaded: {sorted(names)})")
        steer_vector = names[0]
    if steer_vector not in names:
        raise ValueError(f"cannot steer with {steer_vector!r}: not among the loaded vectors {sorted(names)}")
    return [SteeringSpec(vector=steer_vector, layer=int(layer), coef=float(coef), mode=mode,  # type: ignore[arg-type]
                         positions=positions)  # type: ignore[arg-type]
            for layer, coef in steer]


def resolve_api_key(explicit: str | None, environ: Mapping[str, str] | None = None, env: str = API_KEY_ENV
                    ) -> str | None:
    """The key to require: the explicit one, else ``$STEERLIB_API_KEY`` (or the variable ``env``), else None."""
    if explicit:
        return explicit
    value = (os.environ if environ is None else environ).get(env, "").strip()
    return value or None


def build(options: ServeOptions) -> tuple[FastAPI, str]:
    """Load the model and vectors and build the app; returns (app, model name)."""
    from steerlib.core.models import load_model

    options.check()
    engine_factory = None
    if options.engine == "vllm":
        loaded, engine_factory = _vllm_engine(options)
    else:
        loaded = load_model(options.model_path, dtype=options.dtype, device=options.device)
    trait_vectors = named_vectors(loaded.model, options.vectors)
    names = list(trait_vectors)
    app_options = options.app
    specs = default_steering_specs(options.steer, options.steer_vector, names, options.steer_mode,
                                   options.steer_positions)
    app_options = replace(app_options, default_steering=tuple(specs),
                          model_name=loaded.name if app_options.model_name == "steerlib" else app_options.model_name,
                          api_key=resolve_api_key(app_options.api_key),
                          metrics_key=None if app_options.metrics_no_auth else
                          resolve_api_key(app_options.metrics_key, env=METRICS_KEY_ENV))
    traits = names if app_options.monitor_traits is None else list(app_options.monitor_traits)
    drift = DriftMonitor(traits, window=options.drift_window, method=options.drift_method,
                         threshold=options.drift_threshold, reference_size=options.drift_reference_size,
                         alerts_path=options.alerts_path, robust=True) if traits else None
    calibrations = named_calibrations(loaded.model, options.vectors)
    return create_app(loaded.model, loaded.tokenizer, trait_vectors, app_options, drift, calibrations,
                      engine_factory=engine_factory), loaded.name


def _vllm_engine(options: ServeOptions) -> tuple[Any, Any]:
    """The model's shape (meta device) for validation, and a factory of the vLLM engine holding the weights."""
    from steerlib.core.models import load_model_skeleton
    from steerlib.serve.vllm_engine import VllmEngine

    loaded, folder = load_model_skeleton(options.model_path)
    vllm = replace(options.vllm_args, dtype=options.dtype)  # type: ignore[type-var]

    def factory(**kw: Any) -> VllmEngine:
        return VllmEngine(vllm.engine_args(str(folder), max_num_seqs=kw["max_batch"]), loaded.tokenizer, **kw)

    return loaded, factory


def serve(options: ServeOptions, **uvicorn_kwargs: Any) -> None:
    """Load everything and serve until interrupted (what ``steerlib serve`` runs)."""
    import uvicorn

    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, name = build(options)
    service = app.state.service
    log.info("serving %s with vectors %s on http://%s:%d (monitor page at /; %s)", name, sorted(service.vectors),
             options.app.host, options.port, "API key required" if service.options.api_key else "no API key")
    if service.options.metrics_no_auth and options.app.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("/metrics is open to anyone who can reach %s (--metrics-no-auth): it shows trait "
                    "projections and conversation ids", options.app.host)
    if options.app.host not in ("127.0.0.1", "localhost", "::1"):
        if not service.options.api_key:
            log.warning("listening on %s without --api-key: anyone who can reach the port can use the model",
                        options.app.host)
        if options.app.allowed_hosts is None and options.app.host in ("0.0.0.0", "::", ""):
            log.warning("bound to every interface: the Host header is not checked; name the public host "
                        "with --allowed-host to guard against DNS rebinding")
    uvicorn.run(app, host=options.app.host, port=options.port, log_level=options.log_level, **uvicorn_kwargs)
