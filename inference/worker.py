"""One page's work: the worker that colours and writes a batch of pages (`ColorizeWorker`), and the pools that host
workers, in this process (`LocalPool`) or as Ray actors (`RayPool`)."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from inference.models import PageBatchItem
from inference.plan import PageJob, WorkerConfig
from inference.sheets import colorize_sheet
from inference.sources import PageSource, decode_image, read_page
from pipelines.core.page_references import embed_prepared, fitted_reference, load_colorize_encoder, page_composite
from pipelines.core.pagestore import encode_page
from pipelines.core.schemas import STATUS_ERROR, STATUS_OK
from pipelines.core.storage import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

SHEET_QUALITY = 90


# ---- one page's work ---------------------------------------------------------------------------------------------


class ColorizeWorker:
    """Holds the encoder and the models (loaded on first use); as a Ray actor, one per GPU or CPU slot."""

    def __init__(self, config: WorkerConfig) -> None:
        import torch

        from pipelines.runtime.ray import torch_device

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = torch_device(config.device)
        self._encoder = None
        self._colorizer = None
        self._styler = None
        self._readers: OrderedDict[str, Any] = OrderedDict()
        self._refs: OrderedDict[tuple[str, str], Image.Image] = OrderedDict()

    def ready(self) -> str:
        """Load the models now (so a run's page rate excludes loading, and a bad weight fails at once)."""
        if self.config.settings.models is not None:
            self.colorizer()
        return self.device

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        if self._encoder is None:
            self._encoder = load_colorize_encoder(self.config.encoder, self.device)
        return embed_prepared(self._encoder, prepared, self.config.embed_batch)

    def close(self) -> None:
        """Close the archives this worker holds open."""
        while self._readers:
            self._readers.popitem()[1].close()

    def styler(self):
        if self._styler is None:
            from inference.styles import PageStyler

            settings = self.config.settings
            self._styler = PageStyler(
                settings.style, settings.screenstyle_weights, self.device, settings.line_extractor_weights
            )
        return self._styler

    def colorizer(self):
        if self._colorizer is None:
            from inference.models import Colorizer
            from inference.pixart_models import PixArtColorizer

            settings = self.config.settings
            family = PixArtColorizer if settings.models.family == "pixart" else Colorizer
            self._colorizer = family(settings.models, settings.sampling, self.device)
        return self._colorizer

    # -- reading, with small caches: a batch's pages share their chapter's references

    def _reader(self, source: PageSource):
        reader = self._readers.get(source.label)
        if reader is None:
            reader = source.open().__enter__()
            self._readers[source.label] = reader
            while len(self._readers) > 4:
                self._readers.popitem(last=False)[1].close()
        return reader

    def _image(self, source: PageSource, name: str, sha1: str | None = None) -> Image.Image:
        reader = self._reader(source)
        entry = next((p for p in reader.pages if p.name == name), None)
        if entry is None:
            raise FileNotFoundError(f"{source.label}/{name}: no longer in its source")
        read = read_page(reader, entry)
        if read.error:
            raise OSError(read.error)
        if sha1 is not None and read.sha1 != sha1:
            raise RuntimeError(f"{entry.source}: the file changed since the run listed it; run again")
        return decode_image(read.data, entry.source)

    def _fitted_ref(self, source: PageSource, name: str) -> Image.Image:
        settings = self.config.settings
        key = (source.label, name)
        if key not in self._refs:
            self._refs[key] = fitted_reference(self._image(source, name), settings.width, settings.height)
            while len(self._refs) > 64:
                self._refs.popitem(last=False)
        return self._refs[key]

    # -- colouring

    def colorize(self, jobs: list[PageJob]) -> list[dict[str, Any]]:
        """Colour and write a batch of pages; every page gets a result row (ok or error with its cause)."""
        prepared: list[tuple[PageJob, dict[str, Any]]] = []
        results: dict[str, dict[str, Any]] = {}
        for job in jobs:
            try:
                prepared.append((job, self.page_inputs(job)))
            except Exception as exc:  # noqa: BLE001 - a page that cannot be read or composed is its own failure
                results[job.output] = _error_row(job, "preparing", exc)
        if prepared:
            if self.config.settings.models is None:
                outputs: list[Image.Image | None] = [None] * len(prepared)
            else:
                outputs = self._run_models(prepared, results)
            for (job, inputs), final in zip(prepared, outputs, strict=True):
                if job.output in results:
                    continue
                try:
                    results[job.output] = self._write(job, inputs, final)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: this page fails, its row says why
                    results[job.output] = _error_row(job, "writing", exc)
        return [results[job.output] for job in jobs]

    def page_inputs(self, job: PageJob) -> dict[str, Any]:
        """The page read and checked and styled (ICP frame, GSRP guide), its references fitted, its composite."""
        settings = self.config.settings
        page = self._image(job.pages, job.name, job.sha1)
        rows = job.rows
        fitted_refs = {name: self._fitted_ref(job.refs, name) for name in {row["ref_page_id"] for row in rows}}
        frame, hr_bw = self.styler().frames(page, (settings.width, settings.height), settings.sr_size, job.style_seed)
        canvases = page_composite(settings.layout, job.page_id, frame, rows, fitted_refs)
        return {"bw": frame, "canvases": canvases, "hr_bw": hr_bw, "fitted_refs": fitted_refs}

    def _run_models(
        self, prepared: list[tuple[PageJob, dict[str, Any]]], results: dict[str, dict[str, Any]]
    ) -> list[Image.Image | None]:
        """The batch through ICP + GSRP; if the batch fails, each page alone, so a failure names its page."""
        colorizer = self.colorizer()
        layout = self.config.settings.layout
        items = [
            PageBatchItem(inputs["canvases"].refs_only, inputs["canvases"].frame_only, inputs["canvases"].mask,
                          inputs["hr_bw"], job.seed)
            for job, inputs in prepared
        ]  # fmt: skip
        try:
            return colorizer.colorize(items, layout)
        except Exception as exc:  # noqa: BLE001 - a batch's failure is retried page by page below
            if len(items) == 1:
                results[prepared[0][0].output] = _error_row(prepared[0][0], "colouring", exc)
                return [None]
            log.warning("a batch of %d pages failed (%s); colouring its pages one by one", len(items), exc)
        outputs = []
        for (job, _), item in zip(prepared, items, strict=True):
            try:
                outputs.append(colorizer.colorize([item], layout)[0])
            except Exception as exc:  # noqa: BLE001 - this page's failure, the batch goes on
                results[job.output] = _error_row(job, "colouring", exc)
                outputs.append(None)
        return outputs

    def _write(self, job: PageJob, inputs: dict[str, Any], final: Image.Image | None) -> dict[str, Any]:
        out = Path(self.config.output)
        if final is not None and final.size != tuple(job.out_size):
            final = final.resize(tuple(job.out_size), Image.Resampling.BICUBIC)
        if final is not None:
            atomic_write_bytes(out / f"{job.output}.png", encode_page(final.convert("RGB"), "png"))
        sheet = colorize_sheet(inputs["bw"], job.rows, inputs["fitted_refs"], final, title=job.name)
        atomic_write_bytes(out / job.sheet, encode_page(sheet, "jpeg", SHEET_QUALITY))
        record = {
            "fingerprint": job.fingerprint,
            "page": job.name,
            "page_sha1": job.sha1,
            "seed": job.seed,
            "output": f"{job.output}.png" if final is not None else None,
            "contact_sheet": job.sheet,
            "size": list(final.size) if final is not None else None,
            "retrievals": job.rows,
            "settings": self.config.settings_record,
        }
        atomic_write_json(out / f"{job.output}.json", record)  # the page's completion marker: written last
        return {
            "chapter": job.chapter,
            "page": job.name,
            "output": record["output"],
            "contact_sheet": job.sheet,
            "status": STATUS_OK,
        }


def _error_row(job: PageJob, stage: str, exc: BaseException) -> dict[str, Any]:
    return {
        "chapter": job.chapter,
        "page": job.name,
        "output": None,
        "status": STATUS_ERROR,
        "error": f"{job.pages.label}/{job.name}: {stage} failed: {type(exc).__name__}: {exc}",
    }


# ---- the pools that host workers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """Where and how the work runs (never part of a fingerprint)."""

    batch_size: int = 1
    local: bool = False
    actors: int | None = None  # default: one per GPU, else 1
    cpus_per_actor: int | None = None  # CPU actors: default all CPUs split across the actors
    device: str | None = None
    rebuild: bool = False


class LocalPool:
    """One worker in this process (`--local`)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.worker = ColorizeWorker(config)
        self.devices = [self.worker.ready()]

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        return self.worker.embed(prepared)

    def run(self, batches: list[list[PageJob]], bar: tqdm) -> list[dict[str, Any]]:
        results = []
        for batch in batches:
            results.extend(self.worker.colorize(batch))
            bar.update(len(batch))
        return results

    def close(self) -> None:
        self.worker.close()


class RayPool:
    """Colorize actors: one per GPU (the models loaded once in each), or CPU actors on a cluster without GPUs."""

    def __init__(self, config: WorkerConfig, options: RunOptions) -> None:
        import ray

        from pipelines.runtime.ray import cluster_has_gpus, init_ray

        init_ray()
        resources = ray.cluster_resources()
        gpus = cluster_has_gpus()
        cpus = max(1, int(resources.get("CPU", 1)))
        n_actors = options.actors or (max(1, int(resources.get("GPU", 0))) if gpus else 1)
        cpus_per_actor = options.cpus_per_actor or (1 if gpus else max(1, cpus // n_actors))
        actor = ray.remote(ColorizeWorker).options(
            num_gpus=1 if gpus else 0, num_cpus=cpus_per_actor, max_restarts=1, max_task_retries=0
        )
        self.actors = [actor.remote(replace(config, threads=cpus_per_actor)) for _ in range(n_actors)]
        try:
            self.devices = ray.get([a.ready.remote() for a in self.actors])
        except Exception as exc:
            raise RuntimeError(f"colorize workers could not start: {exc}") from exc
        log.info("colorize workers on %s", self.devices)

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        import ray

        return ray.get(self.actors[0].embed.remote(prepared))

    def run(self, batches: list[list[PageJob]], bar: tqdm) -> list[dict[str, Any]]:
        """Two batches in flight per actor; a crashed actor fails its batch's pages, Ray restarts it once."""
        import ray

        queue = deque(batches)
        load = [0] * len(self.actors)
        running: dict[Any, tuple[list[PageJob], int]] = {}
        results = []
        while queue or running:
            while queue and min(load) < 2:
                slot = int(np.argmin(load))
                batch = queue.popleft()
                running[self.actors[slot].colorize.remote(batch)] = (batch, slot)
                load[slot] += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            batch, slot = running.pop(ready[0])
            load[slot] -= 1
            try:
                results.extend(ray.get(ready[0]))
            except Exception as exc:  # noqa: BLE001 - a crashed actor (OOM, lost node) fails this batch only
                results.extend(_error_row(job, "the worker", exc) for job in batch)
            bar.update(len(batch))
        return results

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
