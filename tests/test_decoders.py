"""The two video decoders on the same mp4 files: PyAV and torchcodec pick the same frames (sparse sampling,
evaluation middles and training draws), crop alike, and give the same audio; "auto" picks torchcodec only when
it works and says why not otherwise."""

import io
import json

import numpy as np
import pytest

pytest.importorskip("av", reason="PyAV is not installed (pip install 'fastvl[video]'): decoder tests skipped")

from fastvl.data import SyntheticVideoText, decode_clip, decoder_status, encode_mp4, write_videos  # noqa: E402
from fastvl.data.decode import unavailable_reason  # noqa: E402

TORCHCODEC_WHY = unavailable_reason("torchcodec")
needs_torchcodec = pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=f"torchcodec unusable here: {TORCHCODEC_WHY}")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Synthetic clips with audio (8 frames, 1 s), a 20 s grey-ramp video (frame index = grey level / 6) with
    sparse keyframes, and a 48x32 one (resize + crop)."""
    out = tmp_path_factory.mktemp("dec")
    gen = SyntheticVideoText("train", num_clips=3, frames=8, size=32, fps=8.0, audio=True, motions=("left", "up"))
    manifest = write_videos([gen], out)
    videos = [str(out / json.loads(x)["video"]) for x in open(manifest)]
    n = 40
    ramp = np.repeat((np.arange(n) * 6).astype(np.uint8), 16 * 16 * 3).reshape(n, 16, 16, 3)
    encode_mp4(str(out / "ramp.mp4"), ramp, 2.0, gop=None)
    wide = np.random.default_rng(0).integers(0, 255, (4, 32, 48, 3), dtype=np.uint8)
    encode_mp4(str(out / "wide.mp4"), wide, 4.0)
    return {"videos": videos, "ramp": str(out / "ramp.mp4"), "wide": str(out / "wide.mp4")}


def _decode(path, decoder, **kw):
    args = dict(num_frames=4, size=16, train=False, rng=np.random.default_rng(7), return_times=True)
    args.update(kw)
    return decode_clip(path, decoder=decoder, **args)


def test_auto_choice_is_explained():
    st = decoder_status()
    if TORCHCODEC_WHY:
        assert st.chosen == "pyav" and st.reasons["torchcodec"] == TORCHCODEC_WHY
        assert "torchcodec" in str(st) and TORCHCODEC_WHY[:20] in str(st)
    else:
        assert st.chosen == "torchcodec" and "torchcodec" not in st.reasons


def test_forced_decoder_and_unknown_name(monkeypatch):
    monkeypatch.setenv("FASTVL_VIDEO_DECODER", "pyav")
    assert decoder_status().chosen == "pyav"
    monkeypatch.setenv("FASTVL_VIDEO_DECODER", "ffmpeg")
    with pytest.raises(ValueError, match="FASTVL_VIDEO_DECODER must be one of"):
        decoder_status()
    with pytest.raises(ValueError, match="unknown video decoder 'vlc'"):
        unavailable_reason("vlc")


@needs_torchcodec
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("window", [(None, None), (3.2, 15.0), (0.0, 19.9)])
def test_same_frame_indices_on_a_long_video(clips, train, window):
    start, end = window
    for seed in range(3 if train else 1):
        a = _decode(clips["ramp"], "pyav", train=train, rng=np.random.default_rng(seed), start=start, end=end)
        b = _decode(clips["ramp"], "torchcodec", train=train, rng=np.random.default_rng(seed), start=start, end=end)
        np.testing.assert_allclose(a[3], b[3], atol=1e-6)  # presentation times of the chosen frames

        def index(frames):
            return np.round(frames.reshape(len(frames), -1).mean(1) / 6).astype(int).tolist()

        assert index(a[0]) == index(b[0]) == np.round(a[3] * 2).astype(int).tolist()


@needs_torchcodec
def test_same_frames_crops_and_audio_on_synthetic_clips(clips):
    for path in clips["videos"]:
        for T, train in ((4, False), (3, True), (8, False)):
            kw = dict(num_frames=T, size=16, train=train, audio_rate=8000, audio_samples=4000)
            a = _decode(path, "pyav", rng=np.random.default_rng(1), **kw)
            b = _decode(path, "torchcodec", rng=np.random.default_rng(1), **kw)
            np.testing.assert_allclose(a[3], b[3], atol=1e-6)
            assert a[0].shape == b[0].shape == (T, 16, 16, 3) and a[0].dtype == b[0].dtype == np.uint8
            # the same frames and crop; the resize filters differ (swscale area vs bilinear antialias)
            assert np.abs(a[0].astype(float) - b[0].astype(float)).mean() < 6
            # the same audio window; PyAV's first ~450 samples come out silent (its resampler's start on AAC),
            # torchcodec's follow the source from the first sample: compare past the first 0.1 s
            assert a[2] and b[2] and np.corrcoef(a[1][800:], b[1][800:])[0, 1] > 0.999
    with open(clips["videos"][0], "rb") as f:  # from memory (shards) too
        data = f.read()
    c = _decode(io.BytesIO(data), "torchcodec")
    np.testing.assert_array_equal(c[0], _decode(clips["videos"][0], "torchcodec")[0])


@needs_torchcodec
def test_same_central_and_random_crops_of_a_wide_video(clips):
    for train in (False, True):
        a = _decode(clips["wide"], "pyav", train=train, size=8, rng=np.random.default_rng(3))
        b = _decode(clips["wide"], "torchcodec", train=train, size=8, rng=np.random.default_rng(3))
        # 32x48 -> 8x12 then an 8x8 crop at the same offset: close pixels only when the offsets agree
        assert np.abs(a[0].astype(float) - b[0].astype(float)).mean() < 12
        shifted = np.abs(a[0][:, :, 1:].astype(float) - b[0][:, :, :-1].astype(float)).mean()
        assert shifted > np.abs(a[0].astype(float) - b[0].astype(float)).mean()
