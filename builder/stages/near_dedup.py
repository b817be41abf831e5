"""Near-duplicates: instruction embeddings, their nearest neighbours, and the later copies dropped.

As Magpie measures it (magpie-align/magpie `exp/gen_dis.py`): sentence embeddings (all-mpnet-base-v2 there), unit
length, in a flat faiss index (`Dataset.add_faiss_index`), squared L2 distance to the k nearest neighbours.
`min_neighbor_distance` is the distance to the nearest other row, `repeat_count` the number of rows closer than the
threshold, `min_similar_uuid` the first row (in table order) of that group (a group larger than k is counted whole, by a range
search). A row whose group starts at an earlier
row is a near-duplicate: the first copy stays, the later ones are dropped.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from ..models import ModelSpec, resolve_device
from ..pipeline.stage import DROP_REASON, KEEP, MODEL, ROW_STATS, TABLE, Column, Stage
from ..testing.tiny import resolve_model_path


MAGPIE_REPEAT_DISTANCE = 0.05  # Magpie's threshold for repeat_count: cosine similarity above about 0.975
SEARCH_ROWS = 2048  # queries per faiss search call (k distances and ids each)


@functools.lru_cache(maxsize=1)
def load_embedder(spec: ModelSpec, rank: int | None = None):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            "Near-deduplication needs sentence-transformers and faiss: pip install 'magpie-builder[curation]'."
        ) from error
    device = resolve_device(spec, rank)
    return SentenceTransformer(
        resolve_model_path(spec.name_or_path),
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        device=str(device) if device is not None else None,
    )


@dataclass(frozen=True)
class EmbedSettings:
    embedder_revision: str


def embed_instructions(batch: dict, rank: int | None, *, embedder: ModelSpec, settings: EmbedSettings, batch_size=64):
    """Input column: `instruction`. Output column: `embedding` (float32, unit length)."""
    model = load_embedder(embedder, rank)
    vectors = model.encode(
        batch["instruction"], batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
    )
    return {"embedding": vectors.astype(np.float32).tolist()}


def embed(config, models) -> Stage:
    return Stage(
        name="embed",
        kind=MODEL,
        desc="Embedding instructions",
        apply=embed_instructions,
        reads=("instruction",),
        writes=(Column("embedding", "Unit-length sentence embedding of the instruction."),),
        settings=EmbedSettings(models.embedder_revision),
        models={"embedder": models.embedder},
        runtime={"batch_size": config.embedding_batch_size},
        batch_size=config.shard_size,
    )


@dataclass(frozen=True)
class NeighbourSettings:
    k: int
    distance: float  # drop a row whose group starts earlier; 0 keeps every row
    index: str  # "flat" (exact) or "ivf" (approximate, for millions)
    nprobe: int


def _add_index(rows: Dataset, settings: NeighbourSettings) -> None:
    import faiss

    device = -1 if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 else None
    if settings.index == "flat" or len(rows) < 1000:
        rows.add_faiss_index("embedding", metric_type=faiss.METRIC_L2, device=device, faiss_verbose=False)
        return
    lists = max(1, min(int(4 * math.sqrt(len(rows))), len(rows) // 39))  # faiss asks for 39 points per list
    rows.add_faiss_index(
        "embedding",
        string_factory=f"IVF{lists},Flat",
        metric_type=faiss.METRIC_L2,
        device=device,
        train_size=min(len(rows), lists * 256),
        faiss_verbose=False,
    )
    faiss.extract_index_ivf(rows.get_index("embedding").faiss_index).nprobe = settings.nprobe


def _group_members(index, query: np.ndarray, threshold: float) -> np.ndarray:
    """Every row closer than `threshold` (a range search), for a row whose k nearest all are."""
    _, distances, ids = index.range_search(query[None, :], threshold)
    return ids[distances < threshold]


def find_near_duplicates(rows: Dataset, *, settings: NeighbourSettings) -> Dataset:
    """Input columns: `embedding`, `uuid`. Output columns: `min_neighbor_distance`, `repeat_count`,
    `min_similar_uuid`, `drop_reason` ("near_duplicate" for a row whose group starts at an earlier row)."""
    threshold = settings.distance or MAGPIE_REPEAT_DISTANCE
    k = min(settings.k + 1, len(rows))  # the row itself comes back too
    _add_index(rows, settings)
    faiss_index = rows.get_index("embedding").faiss_index
    vectors = rows.with_format("numpy", columns=["embedding"])
    uuids = rows["uuid"]
    nearest, repeats, group_uuid, reasons = [], [], [], []
    for start in range(0, len(rows), SEARCH_ROWS):
        queries = np.asarray(vectors[start : start + SEARCH_ROWS]["embedding"], dtype=np.float32)
        distances, ids = faiss_index.search(queries, k)
        for offset, (row_distances, row_ids) in enumerate(zip(distances, ids)):
            own = start + offset
            keep = (row_ids != own) & (row_ids >= 0)
            others, other_distances = row_ids[keep][: k - 1], row_distances[keep][: k - 1]
            nearest.append(float(other_distances[0]) if len(others) else None)
            close = others[other_distances < threshold]
            if len(close) and len(close) == k - 1:  # the group may reach past the k searched: count it all
                close = _group_members(faiss_index, queries[offset], threshold)
                close = close[close != own]
            repeats.append(int(len(close)))
            first = int(min(close.min(), own)) if len(close) else None
            group_uuid.append(uuids[first] if first is not None else None)
            drop = settings.distance > 0 and first is not None and first < own
            reasons.append("near_duplicate" if drop else KEEP)
    rows.drop_index("embedding")
    rows = rows.add_column("min_neighbor_distance", nearest)
    rows = rows.add_column("repeat_count", repeats)
    rows = rows.add_column("min_similar_uuid", group_uuid)
    return rows.add_column(DROP_REASON, reasons)


def near_duplicates(config) -> Stage:
    return Stage(
        name="near_dedup",
        kind=TABLE,
        apply=find_near_duplicates,
        reads=("embedding", "uuid"),
        writes=(
            Column(
                "min_neighbor_distance",
                "Squared L2 distance from the instruction's unit embedding to its nearest other instruction's.",
                ROW_STATS,
            ),
            Column(
                "repeat_count", "How many other instructions are closer than the near-duplicate threshold.", ROW_STATS
            ),
            Column(
                "min_similar_uuid",
                "The first row (in build order) of the instruction's near-duplicate group; null when it has none.",
                ROW_STATS,
            ),
        ),
        settings=NeighbourSettings(
            config.near_dedup_k, config.near_dedup_distance, config.near_dedup_index, config.near_dedup_nprobe
        ),
        drop_reasons=("near_duplicate",),
        if_none_left="raise near_dedup_distance's bar (a smaller distance drops fewer rows)",
    )
