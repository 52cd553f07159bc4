"Reliability and integration tests for vidkit.io: real encoded files, every backend, damaged input, workers, URLs."
import os, pickle, threading, time
import http.server
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import encode_jpeg, write_file

from vidkit.core import VideoDecodeError, worker_init
import vidkit.io
from vidkit.encode import make_test_video, moving_gradient
from vidkit.readers import PyAVReader, FrameFolderReader
from vidkit.io import open_video, probe, load_decoder, VideoInfo, DecordReader, TorchCodecReader, AUTO_BACKENDS

HAS_TORCHCODEC = load_decoder('torchcodec') is not None     # optional: needs torchcodec and FFmpeg's shared libraries
BACKENDS = ['decord', 'pyav'] + (['torchcodec'] if HAS_TORCHCODEC else [])
needs_torchcodec = pytest.mark.skipif(not HAS_TORCHCODEC, reason='torchcodec (or the FFmpeg libraries it needs) is not installed')
AUTO_FIRST = next(b for b in AUTO_BACKENDS if b == 'decord' or HAS_TORCHCODEC)   # what 'auto' picks for a healthy file
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning')


def mad(a, b): return (a.float() - b.float()).abs().mean().item()


def reference_frames(path) -> torch.Tensor:
    "Every frame, decoded front to back by PyAV with no seeking: the ground truth for index checks."
    with av.open(str(path)) as c:
        return torch.from_numpy(np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])).permute(0, 3, 1, 2)


def write_bframe_avi(path, n=30, size=(64, 80)):
    "MPEG-4 part 2 in AVI with B-frames (packets out of display order) and a short GOP."
    h, w = size
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=25)
        s.width, s.height, s.pix_fmt, s.bit_rate = w, h, 'yuv420p', 2_000_000
        s.codec_context.gop_size, s.codec_context.max_b_frames = 6, 2
        for t in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(moving_gradient(t, h, w), format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


def write_frames(folder, n, size=(48, 64), tmpl='img_{:05}.jpg', start=1, skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        if t in skip: continue
        img = torch.from_numpy(moving_gradient(t, *size)).permute(2, 0, 1).contiguous()
        write_file(str(folder / tmpl.format(t + start)), encode_jpeg(img, quality=95))
    return folder


@pytest.fixture(scope='module')
def vids(tmp_path_factory):
    d = tmp_path_factory.mktemp('vids')
    v = dict(
        mp4=make_test_video(d/'small.mp4', num_frames=30, size=(64, 80), gop=5),     # H.264 with B-frames, 6 GOPs
        avi=make_test_video(d/'small.avi', num_frames=30, size=(64, 80), gop=8),     # MPEG-4 part 2
        bavi=write_bframe_avi(d/'bframes.avi'),
        mkv=make_test_video(d/'small.mkv', num_frames=20, size=(64, 80), gop=6),     # no frame count in the header
        hd=make_test_video(d/'hd.mp4', num_frames=12, size=(720, 1280), gop=6),
        hdavi=make_test_video(d/'hd.avi', num_frames=10, size=(720, 1280)),
    )
    v['dir'] = d
    return v


# --------------------------------------------------------------------------- each backend on real files

# (decord and torchcodec are not used on B-frame AVI: see test_decord_refuses_bframe_avi, test_torchcodec_bframe_avi)
@pytest.mark.parametrize('backend,key,n', [(b, k, n) for b in BACKENDS for k, n in [('mp4', 30), ('avi', 30), ('bavi', 30), ('mkv', 20)]
                                           if (b, k) not in [('decord', 'bavi'), ('torchcodec', 'bavi')]])
def test_backend_exact_frames(vids, backend, key, n):
    ref = reference_frames(vids[key])
    assert len(ref) == n
    rng = np.random.default_rng(0)
    with open_video(vids[key], backend=backend) as r:
        assert r.backend == backend and (r.num_frames, r.height, r.width) == (n, 64, 80)
        assert r.fps == pytest.approx(25.0) and len(r) == n and r.path == Path(vids[key])
        for idx in [list(range(n)), list(range(n))[::-1], [n - 1, 0, 7, 7, 7, 3], rng.integers(0, n, 12),
                    torch.tensor([5, 4, 3]), np.array([], dtype=np.int64)]:
            x = r.get_frames(idx)
            exp = ref[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
            assert x.dtype == torch.uint8 and x.shape == exp.shape and x.is_contiguous()
            assert torch.equal(x, exp), (key, backend, idx)


def test_decord_refuses_bframe_avi(vids):
    "decord's random access lands on other frames in a B-frame AVI: it must refuse the file, and 'auto' must use PyAV."
    import decord
    vr = decord.VideoReader(str(vids['bavi']), num_threads=1)
    ref = reference_frames(vids['bavi'])
    assert not torch.equal(torch.from_numpy(vr.get_batch([25]).asnumpy()).permute(0, 3, 1, 2), ref[[25]])  # the bug
    del vr
    with pytest.raises(VideoDecodeError, match="backend='pyav'"): open_video(vids['bavi'], backend='decord')
    with open_video(vids['bavi']) as r:
        assert r.backend == 'pyav' and torch.equal(r.get_frames([25, 19, 3]), ref[[25, 19, 3]])


@needs_torchcodec
def test_torchcodec_refuses_bframe_avi(vids):
    "torchcodec's seeking lands on other frames in a B-frame AVI too: it must refuse the file, and 'auto' must use PyAV."
    from torchcodec.decoders import VideoDecoder
    ref = reference_frames(vids['bavi'])
    assert not torch.equal(VideoDecoder(str(vids['bavi'])).get_frames_at([3, 19, 25]).data, ref[[3, 19, 25]])  # the bug
    with pytest.raises(VideoDecodeError, match="backend='pyav'"): open_video(vids['bavi'], backend='torchcodec')
    with open_video(vids['bavi']) as r: assert r.backend == 'pyav'
    for key in ('avi', 'hdavi'):                                  # AVI without B-frames is fine
        with open_video(vids[key], backend='torchcodec') as r: assert r.backend == 'torchcodec'


@pytest.mark.parametrize('key', ['mp4', 'avi', 'mkv', 'hd'])
def test_backends_agree_on_random_batches(vids, key):
    "Every backend returns the same frames as a front-to-back decode for random sparse batches (what TSN sampling asks)."
    ref = reference_frames(vids[key])
    rng = np.random.default_rng(1)
    for b in BACKENDS:
        with open_video(vids[key], backend=b) as r:
            for _ in range(6):
                idx = np.sort(rng.choice(len(ref), min(8, len(ref)), replace=False))
                assert torch.equal(r.get_frames(idx), ref[idx]), (b, key, idx)


def test_auto_picks_the_first_installed_backend(vids, monkeypatch):
    with open_video(vids['mp4']) as r: assert r.backend == AUTO_FIRST
    monkeypatch.setattr(vidkit.io, 'AUTO_BACKENDS', ['decord'])
    with open_video(vids['mp4']) as r: assert r.backend == 'decord'
    monkeypatch.setattr(vidkit.io, 'AUTO_BACKENDS', [])
    with open_video(vids['mp4']) as r: assert r.backend == 'pyav'
    with pytest.raises(ValueError, match='torchcodec'): open_video(vids['mp4'], backend='decord', device='cuda')


def test_reopening_skips_the_checks_but_sees_a_rewritten_file(vids, tmp_path):
    "A file opened before is not probed again (its facts are remembered), unless it changed on disk."
    p = tmp_path/'v.mp4'
    p.write_bytes(Path(vids['mp4']).read_bytes())
    a = DecordReader(p, fallback=True)
    b = DecordReader(p, fallback=True)
    assert (b.num_frames, b.fps, b.height, b.width) == (a.num_frames, a.fps, a.height, a.width) == (30, 25.0, 64, 80)
    assert torch.equal(a.get_frames([7, 2]), b.get_frames([7, 2]))
    a.close(); b.close()
    make_test_video(p, num_frames=12, size=(48, 64))              # the same path, other content
    with DecordReader(p, short_side=24) as c: assert (c.num_frames, c.height, c.width) == (12, 24, 32)
    d = write_frames(tmp_path/'f', 4)
    assert open_video(d).num_frames == 4
    write_frames(tmp_path/'f', 6)
    assert open_video(d).num_frames == 6

def test_pyav_sequential_mode_agrees(vids):
    "The slow exact path (decode from the start, count frames) gives the same frames as seeking."
    with open_video(vids['mp4'], backend='pyav') as r:
        a = r.get_frames([29, 3, 17, 0])
        r._sequential = True
        assert torch.equal(r.get_frames([29, 3, 17, 0]), a)


def test_frames_match_source_pattern(vids):
    "Decoded frames are the frames that were encoded (not a neighbour): each is closest to its own pattern."
    with open_video(vids['mp4']) as r: x = r.get_frames(range(30))
    pats = torch.stack([torch.from_numpy(moving_gradient(t, 64, 80)).permute(2, 0, 1) for t in range(30)])
    for t in range(30):
        d = [mad(x[t], pats[s]) for s in range(30)]
        assert int(np.argmin(d)) == t and d[t] < 5


# --------------------------------------------------------------------------- cross-backend agreement

@pytest.mark.parametrize('key', ['mp4', 'avi', 'hd', 'hdavi'])
def test_decord_pyav_agree(vids, key):
    with open_video(vids[key], backend='decord') as a, open_video(vids[key], backend='pyav') as b:
        assert (a.num_frames, a.height, a.width) == (b.num_frames, b.height, b.width)
        assert a.fps == pytest.approx(b.fps)
        n = a.num_frames
        idx = [n - 1, 0, n // 2, 1, n // 2, n - 2]
        assert mad(a.get_frames(idx), b.get_frames(idx)) < 2


@pytest.mark.parametrize('key,kw,hw', [('mp4', dict(short_side=32), (32, 40)), ('hd', dict(short_side=112), (112, 199)),
                                       ('avi', dict(size=(40, 40)), (40, 40)), ('hd', dict(size=(128, 171)), (128, 171))])
def test_decode_time_resize(vids, key, kw, hw):
    readers = [open_video(vids[key], backend=b, **kw) for b in BACKENDS]
    idx = [0, 5, 3]
    outs = []
    for r in readers:
        assert (r.height, r.width) == hw
        x = r.get_frames(idx)
        assert x.shape == (3, 3) + hw
        outs.append(x)
        r.close()
    assert mad(outs[0], outs[1]) < 2            # decord and PyAV scale while decoding (FFmpeg's swscale)
    # close to resizing the full-size frames afterwards (which is what the torchcodec reader does: one resize per clip)
    from torchvision.transforms.v2.functional import resize
    with open_video(vids[key], backend='pyav') as r: full = resize(r.get_frames(idx), list(hw), antialias=True)
    assert all(mad(o, full) < 4 for o in outs)
    if HAS_TORCHCODEC: assert mad(outs[2], full) < 0.5


def test_resize_args_checked(vids):
    with pytest.raises(ValueError): open_video(vids['mp4'], short_side=32, size=(32, 32))


# --------------------------------------------------------------------------- rawframe folders

def test_rawframes(tmp_path):
    d = write_frames(tmp_path/'v1', 12)
    with open_video(d) as r:                                   # auto picks 'frames' for a folder
        assert (r.backend, r.num_frames, r.height, r.width, r.fps) == ('frames', 12, 48, 64, None)
        x = r.get_frames([11, 0, 11, 4])
        assert x.shape == (4, 3, 48, 64) and torch.equal(x[0], x[2])
        pat = torch.from_numpy(moving_gradient(4, 48, 64)).permute(2, 0, 1)
        assert mad(x[3], pat) < 3
        with pytest.raises(VideoDecodeError, match='out of range'): r.get_frames([12])
    with open_video(d, short_side=24) as r:
        assert (r.height, r.width) == (24, 32) and r.get_frames([1]).shape == (1, 3, 24, 32)
    assert probe(d) == VideoInfo(12, None, 48, 64, None, 'frames')
    assert probe(d, fps=30).duration == pytest.approx(12 / 30)


def test_rawframes_template_and_start_index(tmp_path):
    d = write_frames(tmp_path/'v2', 5, tmpl='{:04d}.png', start=0)
    with open_video(d, filename_tmpl='{:04d}.png', start_index=0) as r:
        assert r.num_frames == 5 and r.frame_path(0).name == '0000.png'
        ref = torch.from_numpy(moving_gradient(3, 48, 64)).permute(2, 0, 1)
        assert torch.equal(r.get_frames([3])[0], FrameFolderReader(d, filename_tmpl='{:04d}.png', start_index=0).get_frames([3])[0])
        assert mad(r.get_frames([3])[0], ref) < 3
    with pytest.raises(VideoDecodeError, match='start_index=1'): open_video(d, filename_tmpl='{:04d}.png')
    with pytest.raises(VideoDecodeError, match='no frame files match'): open_video(d)   # default template: img_*.jpg


def test_rawframes_missing_frames(tmp_path):
    d = write_frames(tmp_path/'gap', 10, skip=(4, 6))
    with pytest.raises(VideoDecodeError) as ei: open_video(d)
    msg = str(ei.value)
    assert str(d) in msg and 'missing' in msg and 'img_00005.jpg' in msg and 'img_00007.jpg' in msg
    empty = tmp_path/'empty'; empty.mkdir()
    with pytest.raises(VideoDecodeError, match='empty'): open_video(empty)
    # a frame that vanishes or is corrupt after opening
    d2 = write_frames(tmp_path/'later', 6)
    r = open_video(d2)
    (d2/'img_00003.jpg').unlink()
    (d2/'img_00004.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(VideoDecodeError, match='img_00003.jpg: file is missing') as ei: r.get_frames([0, 2])
    assert ei.value.path == str(d2)
    with pytest.raises(VideoDecodeError, match='img_00004.jpg'): r.get_frames([3])
    assert r.get_frames([5]).shape == (1, 3, 48, 64)


def test_backend_mismatch(tmp_path, vids):
    d = write_frames(tmp_path/'v', 3)
    with pytest.raises(VideoDecodeError, match='directory'): open_video(d, backend='decord')
    with pytest.raises(VideoDecodeError, match='folder'): open_video(vids['mp4'], backend='frames')
    with pytest.raises(ValueError): open_video(vids['mp4'], backend='opencv')


# --------------------------------------------------------------------------- probe

@pytest.mark.parametrize('key,n', [('mp4', 30), ('avi', 30), ('mkv', 20), ('hd', 12)])
def test_probe(vids, key, n):
    info = probe(vids[key])
    h, w = (720, 1280) if key == 'hd' else (64, 80)
    assert (info.num_frames, info.height, info.width, info.backend) == (n, h, w, 'pyav')
    assert info.fps == pytest.approx(25) and info.duration == pytest.approx(n / 25)
    d = probe(vids[key], backend='decord')
    assert d.backend == 'decord' and d[:4] == info[:4]


def test_probe_counts_packets_when_header_has_no_count(vids):
    with av.open(str(vids['mkv'])) as c: assert c.streams.video[0].frames == 0   # the case being tested
    assert probe(vids['mkv']).num_frames == 20


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope='module')
def bad(vids, tmp_path_factory):
    d = tmp_path_factory.mktemp('bad')
    data = Path(vids['mp4']).read_bytes()
    (d/'empty.mp4').write_bytes(b'')
    (d/'random.mp4').write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d/'text.mp4').write_text('id,label\n1,jumping\n')
    (d/'trunc.mp4').write_bytes(data[:len(data) // 2])                 # moov atom (at the end) is lost
    return d


@pytest.mark.parametrize('backend', ['auto', 'decord', 'pyav', pytest.param('torchcodec', marks=needs_torchcodec)])
@pytest.mark.parametrize('name,reason', [('missing.mp4', 'no such file'), ('empty.mp4', r'empty \(0 bytes\)'),
                                         ('random.mp4', 'cannot read it'), ('text.mp4', 'cannot read it'),
                                         ('trunc.mp4', 'cannot read it')])
def test_bad_files(bad, backend, name, reason):
    p = bad/name
    with pytest.raises(VideoDecodeError, match=reason) as ei: open_video(p, backend=backend)
    assert ei.value.path == str(p) and str(ei.value).startswith(str(p))
    if backend == 'auto' and 'cannot' in reason: assert 'not a readable video' in str(ei.value)
    with pytest.raises(VideoDecodeError, match=reason) as ei: probe(p, backend=backend)
    assert ei.value.path == str(p)


def _faststart_copy(src, dst):
    "Remux with the index (moov) first, so that a truncated copy still opens and claims every frame."
    with av.open(str(src)) as i, av.open(str(dst), 'w', options={'movflags': 'faststart'}) as o:
        s = i.streams.video[0]
        os_ = o.add_stream_from_template(s)
        for p in i.demux(s):
            if p.dts is None: continue
            p.stream = os_
            o.mux(p)
    return dst


def test_truncated_file_header_claims_more_frames(vids, tmp_path):
    full = _faststart_copy(vids['mp4'], tmp_path/'fast.mp4')
    data = full.read_bytes()
    cut = tmp_path/'cut.mp4'
    cut.write_bytes(data[:int(len(data) * 0.6)])
    assert probe(cut).num_frames == 30                         # the header still promises 30 frames
    ref = reference_frames(vids['mp4'])
    t0 = time.time()
    with open_video(cut) as r:                                 # decord refuses it; auto falls back to PyAV
        assert r.backend == 'pyav' and r.num_frames < 30
        ok = 0
        for i in range(r.num_frames):
            try: x = r.get_frames([i])
            except VideoDecodeError as e:
                assert str(cut) in str(e) and 'truncated' in str(e)
                continue
            assert torch.equal(x[0], ref[i])                   # what decodes is right, never a stale frame
            ok += 1
        assert 0 < ok < r.num_frames
        with pytest.raises(VideoDecodeError): r.get_frames(range(r.num_frames))
        with pytest.raises(VideoDecodeError, match='out of range'): r.get_frames([29])
    assert time.time() - t0 < 20


def test_truncated_avi(vids, tmp_path):
    data = Path(vids['avi']).read_bytes()
    cut = tmp_path/'cut.avi'
    cut.write_bytes(data[:int(len(data) * 0.7)])
    ref = reference_frames(vids['avi'])
    assert probe(cut).num_frames == 30                         # the AVI header still lists 30 frames
    for backend in ['auto', 'pyav']:
        with open_video(cut, backend=backend) as r:
            assert r.backend == 'pyav' and 0 < r.num_frames < 30   # 'auto' avoids decord on a truncated file
            x = r.get_frames(range(r.num_frames))
            assert torch.equal(x, ref[:r.num_frames])
            with pytest.raises(VideoDecodeError, match='out of range'): r.get_frames([r.num_frames])


@pytest.mark.parametrize('backend', ['auto'] + BACKENDS)
def test_bad_indices(vids, backend):
    with open_video(vids['mp4'], backend=backend) as r:
        for bad_idx in ([30], [-1], [0, 5, 1000]):
            with pytest.raises(VideoDecodeError) as ei: r.get_frames(bad_idx)
            assert str(vids['mp4']) in str(ei.value) and 'out of range' in str(ei.value) and '30 frames' in str(ei.value)
        with pytest.raises(TypeError): r.get_frames([1.5])
        assert r.get_frames([29]).shape == (1, 3, 64, 80)      # still usable afterwards


def test_decord_decode_failure_falls_back_to_pyav(vids, monkeypatch):
    import decord
    ref = reference_frames(vids['mp4'])
    monkeypatch.setattr(vidkit.io, 'AUTO_BACKENDS', ['decord'])
    r_auto, r_strict = open_video(vids['mp4']), open_video(vids['mp4'], backend='decord')
    assert r_auto.backend == 'decord'
    def broken(self, indices): raise decord._ffi.base.DECORDError('simulated decode failure')
    monkeypatch.setattr(decord.VideoReader, 'get_batch', broken)
    assert torch.equal(r_auto.get_frames([4, 2]), ref[[4, 2]])
    assert r_auto.backend == 'pyav'
    with pytest.raises(VideoDecodeError, match='simulated decode failure') as ei: r_strict.get_frames([4])
    assert ei.value.path == str(vids['mp4'])
    r_auto.close(); r_strict.close()


@needs_torchcodec
def test_torchcodec_decode_failure_falls_back_to_pyav(vids, monkeypatch):
    from torchcodec.decoders import VideoDecoder
    ref = reference_frames(vids['mp4'])
    r_auto, r_strict = TorchCodecReader(vids['mp4'], fallback=True), open_video(vids['mp4'], backend='torchcodec')
    def broken(self, indices): raise RuntimeError('simulated decode failure')
    monkeypatch.setattr(VideoDecoder, 'get_frames_at', broken)
    assert torch.equal(r_auto.get_frames([4, 2]), ref[[4, 2]]) and r_auto.backend == 'pyav'
    with pytest.raises(VideoDecodeError, match='simulated decode failure') as ei: r_strict.get_frames([4])
    assert ei.value.path == str(vids['mp4'])
    r_auto.close(); r_strict.close()


@needs_torchcodec
def test_torchcodec_refuses_truncated_under_auto(vids, tmp_path):
    cut = tmp_path/'cut.mp4'
    data = _faststart_copy(vids['mp4'], tmp_path/'fast.mp4').read_bytes()
    cut.write_bytes(data[:int(len(data) * 0.6)])
    with pytest.raises(VideoDecodeError, match='truncated'): TorchCodecReader(cut, fallback=True)
    with open_video(cut, backend='torchcodec') as r: assert 0 < r.num_frames < 30


# --------------------------------------------------------------------------- handles, pickling, workers

def _open_fds():
    return len(os.listdir('/proc/self/fd'))


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc')
@pytest.mark.parametrize('backend', BACKENDS)
def test_close_releases_handles(vids, backend):
    for _ in range(3): open_video(vids['mp4'], backend=backend).close()   # warm-up (lazy imports, log files)
    before = _open_fds()
    for _ in range(20):
        with open_video(vids['mp4'], backend=backend) as r: r.get_frames([3, 9])
    for _ in range(20):
        r = open_video(vids['mp4'], backend=backend); r.get_frames([1]); del r      # __del__ releases it too
    assert _open_fds() <= before
    r = open_video(vids['mp4'], backend=backend)
    r.close(); r.close()                                                      # idempotent
    assert r.get_frames([2]).shape == (1, 3, 64, 80)                          # reopens on demand
    r.close()


@pytest.mark.parametrize('backend', ['auto', 'pyav'])
def test_pickle(vids, backend):
    r = open_video(vids['mp4'], backend=backend)
    a = r.get_frames([6, 1])
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._handle is None and r2.num_frames == 30 and torch.equal(r2.get_frames([6, 1]), a)
    r.close(); r2.close()


class ClipDS(Dataset):
    def __init__(self, reader, n): self.r, self.n = reader, n
    def __len__(self): return self.n
    def __getitem__(self, i): return self.r.get_frames([i, i + 2, i]), os.getpid()


@pytest.mark.parametrize('backend', BACKENDS + ['frames'])
def test_dataloader_fork_workers(vids, tmp_path, backend):
    src = write_frames(tmp_path/'f', 30, size=(64, 80)) if backend == 'frames' else vids['mp4']
    r = open_video(src, backend=backend)
    ref = r.get_frames(range(30))            # the parent reads first: its decoder is open when the workers fork
    dl = DataLoader(ClipDS(r, 24), batch_size=4, num_workers=2, multiprocessing_context='fork',
                    worker_init_fn=worker_init, timeout=60)
    clips, pids = zip(*dl)
    x, pids = torch.cat(clips), set(torch.cat(pids).tolist())
    assert os.getpid() not in pids and len(pids) == 2
    assert torch.equal(x, torch.stack([ref[[i, i + 2, i]] for i in range(24)]))
    assert torch.equal(r.get_frames([5]), ref[[5]])   # the parent's reader still works
    r.close()


# --------------------------------------------------------------------------- URLs

class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path.startswith('/slow'):
            time.sleep(3); return super().do_GET()
        if self.path.startswith('/short'):
            self.send_response(200); self.send_header('Content-Length', '100000'); self.end_headers()
            self.wfile.write(b'\0' * 100); return
        return super().do_GET()


@pytest.fixture
def server(vids):
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), lambda *a, **k: _Handler(*a, directory=str(vids['dir']), **k))
    srv.daemon_threads, srv.hits = True, []
    th = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    th.start()
    try: yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    finally:
        srv.shutdown(); srv.server_close(); th.join(5)


def test_url(server, vids, tmp_path):
    base, srv = server
    url = f"{base}/small.mp4"
    with open_video(url, cache_dir=tmp_path) as r:
        assert r.name == url and r.path.parent == tmp_path and r.path.suffix == '.mp4' and r.num_frames == 30
        with open_video(vids['mp4']) as local: assert torch.equal(r.get_frames([0, 17]), local.get_frames([0, 17]))
    assert probe(url, cache_dir=tmp_path).num_frames == 30
    assert srv.hits == ['/small.mp4']                        # downloaded once, then read from the cache
    assert not list(tmp_path.glob('*.part'))
    with open_video(f"{base}/hd.mp4", cache_dir=tmp_path, short_side=112) as r:
        assert (r.height, r.width) == (112, 199)


def test_url_failures(server, tmp_path):
    base, srv = server
    with pytest.raises(VideoDecodeError) as ei: open_video(f"{base}/nope.mp4", cache_dir=tmp_path)
    assert ei.value.path == f"{base}/nope.mp4" and '404' in str(ei.value) and 'download failed' in str(ei.value)
    with pytest.raises(VideoDecodeError, match='IncompleteRead|incomplete'): open_video(f"{base}/short.mp4", cache_dir=tmp_path)
    t0 = time.time()
    with pytest.raises(VideoDecodeError, match='timed out'): open_video(f"{base}/slow.mp4", cache_dir=tmp_path, timeout=0.5)
    assert time.time() - t0 < 3
    # a port nobody listens on
    import socket
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    with pytest.raises(VideoDecodeError, match='download failed') as ei: open_video(f"http://127.0.0.1:{port}/x.mp4", cache_dir=tmp_path)
    assert f"127.0.0.1:{port}/x.mp4" in str(ei.value)
    assert not [p for p in tmp_path.iterdir()]               # no partial files left behind
