"""From a decoded video to the model's clip: which frames a clip takes (stride windows or equal segments), the
random generator of each choice about a sample, the crops and resizes, and ImageNet normalisation on the device.

Every random choice about a sample (frames, crop, tube mask, text mask, caption, retry) comes from
``sample_rng(seed, epoch, index, stream)``: a batch split over processes, a resumed run and a re-run all see the
same samples. Global ``np.random`` / ``random`` are never used here.

Frame indices come in two families, each with a training form (one random clip) and an evaluation form (views
spread deterministically over the video): stride (VideoMAE: stride_frame_indices / stride_clip_indices) and equal
segments (Singularity / SViTT: segment_frame_indices / segment_clip_indices); train_frame_indices and
eval_clip_indices pick the family by --sample_type / --sample_type_test.

Clips stay uint8 [3, T, H, W] through the loader; normalize_video makes the model's float input on the device.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)  # GroupMultiScaleCrop scales of the release (VideoMAE)


# ----------------------------------------------------------------------------------------------- randomness


def copy_stream(stream: str, copy: int) -> str:
    """The random stream of a sample's copy-th clip (--clips_per_video): copy 0 keeps the single clip's stream."""
    return stream if copy == 0 else f"{stream}/{copy}"


def sample_rng(seed: int, epoch: int, index: int, stream: str) -> np.random.Generator:
    """The generator of one random choice about one sample: a pure function of (seed, epoch, index, stream).

    stream names the use ("frames", "crop", "video_mask", "text_mask", "caption", "retry"), so the choices are
    independent of each other and of the order in which samples are drawn, by whichever process.
    """
    values = (int(seed), int(epoch), int(index))
    if min(values) < 0:
        raise ValueError(f"sample_rng needs non-negative seed, epoch and index, got {values}")
    return np.random.default_rng(np.random.SeedSequence([*values, zlib.crc32(stream.encode("utf-8"))]))


# ----------------------------------------------------------------------------------------------- frame sampling


def _check_sampling(num_video_frames: int, num_frames: int, sampling_rate: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"the video has no frames ({num_video_frames})")
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"need num_frames >= 1 and sampling_rate >= 1, got {num_frames} and {sampling_rate}")


def stride_frame_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                           rng: np.random.Generator) -> list[int]:
    """VideoMAE pre-training sampling: a random start in [0, n - num_frames * rate], then every rate-th frame.

    Videos shorter than the window start at 0 and repeat their last frame (indices clamped, never out of range).
    """
    _check_sampling(num_video_frames, num_frames, sampling_rate)
    window = num_frames * sampling_rate
    start = int(rng.integers(0, num_video_frames - window + 1)) if num_video_frames >= window else 0
    return [min(start + i * sampling_rate, num_video_frames - 1) for i in range(num_frames)]


def stride_clip_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                      num_segments: int) -> list[list[int]]:
    """num_segments clips of num_frames (stride sampling_rate) with starts spread evenly over the video (one
    segment: the middle clip). Deterministic; indices clamped to the video."""
    _check_sampling(num_video_frames, num_frames, sampling_rate)
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    last_start = max(0, num_video_frames - num_frames * sampling_rate)
    if num_segments == 1:
        starts = [last_start // 2]
    else:
        starts = [int(round(k * last_start / (num_segments - 1))) for k in range(num_segments)]
    return [[min(s + i * sampling_rate, num_video_frames - 1) for i in range(num_frames)] for s in starts]



# How a clip's frames are chosen (--sample_type / --sample_type_test):
# stride: VideoMAE's num_frames at stride --sampling_rate (training: a random window; evaluation: windows spread
#         over the video); rand / middle: the whole video cut into num_frames equal segments (Singularity / ALBEF /
#         SViTT), one frame of each: a uniformly random one (rand) or the middle one (middle).
SAMPLE_TYPES = ("stride", "rand", "middle")


def default_test_sample_type(sample_type: str) -> str:
    """Evaluation clips follow the training family: segment-middle after segment training, else stride."""
    return "middle" if sample_type in ("rand", "middle") else "stride"


def resolve_sample_types(args: Any) -> None:
    """--sample_type_test's default follows --sample_type (segment-trained models are evaluated on segment
    middles); set at a run's start, before its settings are saved or compared on resume, so they hold the value
    used."""
    if hasattr(args, "sample_type") and getattr(args, "sample_type_test", None) is None:
        args.sample_type_test = default_test_sample_type(args.sample_type)


def check_sample_type(sample_type: str) -> None:
    if sample_type not in SAMPLE_TYPES:
        raise ValueError(f"unknown sample type {sample_type!r}; choose one of {', '.join(SAMPLE_TYPES)}")


def segment_bounds(num_video_frames: int, num_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of num_frames equal segments of the whole video: edges i * n // num_frames (the
    integer linspace of Singularity / ALBEF), so the segments tile [0, n) with lengths differing by at most one.

    A video shorter than num_frames has segments narrower than a frame; each then holds the one frame its start
    falls in, so frames repeat in order, evenly (3 frames, 6 segments: 0 0 1 1 2 2; Singularity instead pads the
    end with the last frame: 0 1 2 2 2 2)."""
    _check_sampling(num_video_frames, num_frames, 1)
    edges = [i * num_video_frames // num_frames for i in range(num_frames + 1)]
    return [(a, max(b, a + 1)) for a, b in zip(edges, edges[1:])]


def segment_frame_indices(num_video_frames: int, num_frames: int, sample_type: str,
                          rng: np.random.Generator | None = None, view: int = 0, num_views: int = 1) -> list[int]:
    """One frame of each of num_frames equal segments: uniformly random over the segment (rand, drawn from rng;
    Singularity's never drew a segment's last frame) or, for middle, the frame at relative position
    (view + 0.5) / num_views of its segment, a position on a frame boundary taking the earlier frame (one view:
    the middle frame, the earlier of two middles, as Singularity / SViTT evaluate). Integer arithmetic."""
    bounds = segment_bounds(num_video_frames, num_frames)
    if sample_type == "rand":
        if rng is None:
            raise ValueError("rand sampling needs the sample's generator (rng)")
        starts, ends = np.array(bounds).T
        return [int(i) for i in rng.integers(starts, ends)]
    if sample_type != "middle":
        raise ValueError(f"segment sampling is rand or middle, got {sample_type!r}")
    if not 0 <= view < num_views:
        raise ValueError(f"need 0 <= view < num_views, got view {view} of {num_views}")
    return [a + ((2 * view + 1) * (b - a) - 1) // (2 * num_views) for a, b in bounds]


def segment_clip_indices(num_video_frames: int, num_frames: int, num_views: int, sample_type: str,
                         rng: np.random.Generator | None = None) -> list[list[int]]:
    """num_views evaluation clips of segment sampling. middle: view j takes, in every segment, the frame at
    relative position (j + 0.5) / num_views (one view: the middle), so the views spread through each segment;
    rand: each view one independent random frame per segment, drawn from rng in view order."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if sample_type == "rand":
        return [segment_frame_indices(num_video_frames, num_frames, "rand", rng) for _ in range(num_views)]
    return [segment_frame_indices(num_video_frames, num_frames, sample_type, view=j, num_views=num_views)
            for j in range(num_views)]


def train_frame_indices(num_video_frames: int, num_frames: int, sampling_rate: int, sample_type: str,
                        rng: np.random.Generator) -> list[int]:
    """A training clip's frames under --sample_type (sampling_rate is used by stride only)."""
    check_sample_type(sample_type)
    if sample_type == "stride":
        return stride_frame_indices(num_video_frames, num_frames, sampling_rate, rng)
    return segment_frame_indices(num_video_frames, num_frames, sample_type, rng)


def eval_clip_indices(num_video_frames: int, num_frames: int, sampling_rate: int, num_views: int,
                      sample_type: str, rng: np.random.Generator | None = None) -> list[list[int]]:
    """An evaluation video's num_views clips under --sample_type_test (sampling_rate is used by stride only; rng
    by rand only)."""
    check_sample_type(sample_type)
    if sample_type == "stride":
        return stride_clip_indices(num_video_frames, num_frames, sampling_rate, num_views)
    return segment_clip_indices(num_video_frames, num_frames, num_views, sample_type, rng)


# ----------------------------------------------------------------------------------------------- clip transforms

_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) * 255
_INV_STD_255 = 1.0 / (torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255)
_SHIFT = -_MEAN_255 * _INV_STD_255


def multi_scale_crop_box(height: int, width: int, input_size: int, rng: np.random.Generator,
                         scales: Sequence[float] = MULTI_SCALES, max_distort: int = 1) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of VideoMAE's GroupMultiScaleCrop with fix_crop and more_fix_crop=False.

    Crop sides are scales of the short side (sides within 2 px of input_size snap to it), height and width at
    most max_distort scale steps apart; the box sits at one of 5 fixed places (4 corners, centre).
    """
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [input_size if abs(s - input_size) < 3 else s for s in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    crop_w, crop_h = max(1, min(crop_w, width)), max(1, min(crop_h, height))  # snapping may exceed a small frame
    w_step, h_step = (width - crop_w) // 4, (height - crop_h) // 4
    offsets = [(0, 0), (0, 4 * w_step), (4 * h_step, 0), (4 * h_step, 4 * w_step), (2 * h_step, 2 * w_step)]
    top, left = offsets[int(rng.integers(len(offsets)))]
    return top, left, crop_h, crop_w


def _resize(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, h, w], one bilinear antialiased resize of the whole clip (PIL-like)."""
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # channels-last memory: fast path
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=True)


def _channels_first(clip: torch.Tensor) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> uint8 [3, T, H, W], contiguous (the layout the models take, still 1 byte a value)."""
    return clip.permute(1, 0, 2, 3).contiguous()


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, T, H, W] (what the loader yields) -> float32 ImageNet-normalised, on video's device.

    Clips stay uint8 through the data-loader workers' shared memory (4x fewer bytes than float32) and are
    normalised here, on the device, right before the model (whose contract takes normalised float video). One
    fused multiply-add with the same constants on every device. A floating tensor is taken as normalised already
    (batches built by hand, e.g. the benchmarks) and returned unchanged."""
    if video.is_floating_point():
        return video
    if video.dtype != torch.uint8:
        raise TypeError(f"video must be uint8 pixels or normalised float, got {video.dtype}")
    scale, shift = on_device(video.device, inv_std_255=_INV_STD_255, shift=_SHIFT)
    return torch.addcmul(shift, video.float(), scale)


_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def on_device(device: torch.device, **constants: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Module constants (CPU tensors, by name) on `device`, copied there once: a copy from pageable memory in every
    step would make the host wait for the GPU."""
    for name, value in constants.items():
        if (name, device) not in _ON_DEVICE:
            _ON_DEVICE[(name, device)] = value.to(device)
    return tuple(_ON_DEVICE[(name, device)] for name in constants)


def train_clip_transform(frames: np.ndarray, input_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Pre-training augmentation: one multi-scale corner/centre crop for every frame (on uint8), one resize to
    input_size, no flip. frames uint8 [T, H, W, 3] -> uint8 [3, T, input_size, input_size] (normalize_video makes
    the model's input on the device)."""
    top, left, h, w = multi_scale_crop_box(frames.shape[1], frames.shape[2], input_size, rng)
    return _channels_first(_resize(frames[:, top:top + h, left:left + w], (input_size, input_size)))


def _short_side_resize(frames: np.ndarray, short_side: int) -> torch.Tensor:
    h, w = frames.shape[1:3]
    size = (short_side, max(1, int(w * short_side / h))) if h <= w else (max(1, int(h * short_side / w)), short_side)
    return _resize(frames, size)


def eval_views(frames: np.ndarray, clips: Sequence[Sequence[int]], input_size: int, short_side_size: int,
               num_crops: int) -> torch.Tensor:
    """Evaluation views: frames uint8 [U, H, W, 3] (the decoded frames), clips = rows of positions into them.

    The short side is resized to short_side_size once; each clip gives num_crops input_size squares spaced
    along the long side (centred on the short side). -> uint8 [V, 3, T, input_size, input_size], V = clips x
    crops, clip-major (normalize_video makes the model's input on the device)."""
    if short_side_size < input_size:
        raise ValueError(f"short_side_size {short_side_size} < input_size {input_size}")
    resized = _short_side_resize(frames, short_side_size)  # [U, 3, h, w]
    h, w = resized.shape[-2:]
    long_is_w = w >= h
    long_side, short = (w, h) if long_is_w else (h, w)
    across = (short - input_size) // 2
    if num_crops == 1:
        along = [(long_side - input_size) // 2]
    else:
        along = [int(round(k * (long_side - input_size) / (num_crops - 1))) for k in range(num_crops)]
    views = []
    for rows in clips:
        clip = resized[list(rows)]
        for a in along:
            top, left = (across, a) if long_is_w else (a, across)
            views.append(_channels_first(clip[:, :, top:top + input_size, left:left + input_size]))
    return torch.stack(views)


def span_frames(num_video_frames: int, fps: float,
                span: tuple[float | None, float | None] | None) -> tuple[int, int]:
    """A span (start, end) in seconds -> (first frame, frame count) of the video's frames in it: from frame
    floor(start x fps) to ceil(end x fps) (exclusive), None meaning the video's start / end. A span beyond the
    video keeps at least its last frame, so a record never has no frames."""
    if span is None or fps <= 0:
        return 0, num_video_frames
    start, end = span
    first = min(int(math.floor((start or 0.0) * fps)), num_video_frames - 1)
    stop = num_video_frames if end is None else min(int(math.ceil(end * fps)), num_video_frames)
    return first, max(1, stop - first)


def equal_row_count(mask: torch.Tensor) -> int:
    """The number of True per row of a bool [B, N] mask, checked equal over the rows on the host (a tube mask's
    visible count: the model selects the tubes with shapes known before the step, no sync on the device)."""
    counts = mask.sum(dim=1).tolist()
    if len(set(counts)) > 1:
        raise ValueError(f"every clip of a batch needs the same number of masked tubes, got {counts}")
    return counts[0]
