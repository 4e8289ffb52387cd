"""Data for pretraining: the embedded synthetic dataset, video files (PyAV or torchcodec), tar shards, a local
tokenizer and the loader that turns any of them into batches (see :mod:`fastvl.data.loader` for the batch
contract).

    from fastvl.data import build_loader
    loader = build_loader("synthetic", 32, train=True)          # or "data/manifest.jsonl", "shards/{000..009}.tar"
    batch = next(iter(loader))   # video (32, 3, 3, 32, 32), text_ids/text_mask (32, 16), label, index, caption
"""

from fastvl.data.decode import ClipError, SkippedVideoWarning, decode_clip, decoder_status
from fastvl.data.loader import Collate, DistributedSampler, Loader, build_loader, open_dataset, spec_kind
from fastvl.data.manifest import ManifestEntry, read_manifest
from fastvl.data.mp4 import encode_mp4, encode_mp4_bytes, write_videos
from fastvl.data.shard_names import compact_pattern, expand_pattern
from fastvl.data.shard_writer import write_shards
from fastvl.data.shards import ShardDataset
from fastvl.data.synthetic import SyntheticConfig, SyntheticVideoText, caption
from fastvl.data.tokenizer import Tokenizer
from fastvl.data.transforms import CLIP_MEAN, CLIP_STD, denormalize, normalize
from fastvl.data.video import VideoDataset

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipError",
    "Collate",
    "DistributedSampler",
    "Loader",
    "ManifestEntry",
    "ShardDataset",
    "SkippedVideoWarning",
    "SyntheticConfig",
    "SyntheticVideoText",
    "Tokenizer",
    "VideoDataset",
    "build_loader",
    "caption",
    "compact_pattern",
    "decode_clip",
    "decoder_status",
    "denormalize",
    "encode_mp4",
    "encode_mp4_bytes",
    "expand_pattern",
    "normalize",
    "open_dataset",
    "read_manifest",
    "spec_kind",
    "write_shards",
    "write_videos",
]
