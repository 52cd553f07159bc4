"Integration tests for vidkit.synth: files on disk, decoding with PyAV (and vidkit.io), determinism, worker processes."
import re
from pathlib import Path
import numpy as np
import pytest
import av
from vidkit.synth import (make_synthetic_dataset, SYNTH_CLASSES, TEMPORAL_CLASSES, APPEARANCE_CLASSES,
                          SYNTH_FLIP_LABEL_MAP, SynthDataset)

TINY = dict(n_per_class=2, size=(64, 80), num_frames=(12, 16))


def _decode(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp('synth') / 'a', seed=0, n_workers=0, **TINY)


def test_layout_and_line_formats(tiny):
    root = tiny.root
    assert isinstance(tiny, SynthDataset)
    assert tiny.classes_file.read_text().splitlines() == list(SYNTH_CLASSES) == tiny.classes
    assert len(SYNTH_CLASSES) >= 8 and len(TEMPORAL_CLASSES) >= len(SYNTH_CLASSES) / 2
    assert set(TEMPORAL_CLASSES).isdisjoint(APPEARANCE_CLASSES)
    video_re = re.compile(r'^videos/([a-z_]+)/([a-z_]+_\d{4})\.mp4 (\d+)$')
    raw_re = re.compile(r'^rawframes/([a-z_]+_\d{4}) (\d+) (\d+)$')
    seen = {}
    for split, lst, raw in [('train', tiny.train_list, tiny.train_rawframes), ('val', tiny.val_list, tiny.val_rawframes)]:
        vlines, rlines = lst.read_text().splitlines(), raw.read_text().splitlines()
        assert len(vlines) == len(rlines) == len(SYNTH_CLASSES)   # 2 per class: 1 train + 1 val
        for vl, rl in zip(vlines, rlines):
            m, r = video_re.match(vl), raw_re.match(rl)
            assert m and r, (vl, rl)
            cls, name, label = m.group(1), m.group(2), int(m.group(3))
            assert 0 <= label < len(SYNTH_CLASSES) and SYNTH_CLASSES[label] == cls and name.startswith(cls + '_')
            assert r.group(1) == name and int(r.group(3)) == label and 12 <= int(r.group(2)) <= 16
            assert (root / 'videos' / cls / f'{name}.mp4').is_file()
            seen[name] = (split, int(r.group(2)))
    assert len(seen) == 2 * len(SYNTH_CLASSES)
    assert {it.name: (it.split, it.num_frames) for it in tiny.items} == seen
    assert sorted(tiny.videos) == sorted(root.glob('videos/*/*.mp4'))
    assert not [p for p in root.rglob('*') if '.tmp' in p.name]


def test_decoded_frame_counts_match_lists(tiny):
    for line in (tiny.train_rawframes.read_text() + tiny.val_rawframes.read_text()).splitlines()[::5]:
        d, n, label = line.split()
        name = Path(d).name
        cls = SYNTH_CLASSES[int(label)]
        frames = _decode(tiny.root / 'videos' / cls / f'{name}.mp4')
        assert frames.shape == (int(n), 64, 80, 3) and frames.dtype == np.uint8
        files = sorted(p.name for p in (tiny.root / d).iterdir())
        assert files == [f'img_{i:05d}.jpg' for i in range(1, int(n) + 1)]


def test_open_video_reads_the_files(tiny):
    io = pytest.importorskip('vidkit.io')
    it = tiny.items[3]
    frames = _decode(it.video)
    for src in (it.video, it.frames):
        with io.open_video(src) as r:
            assert r.num_frames == it.num_frames and (r.height, r.width) == (64, 80)
            clip = r.get_frames([0, 5, it.num_frames - 1])
        assert tuple(clip.shape) == (3, 3, 64, 80)
        ref = np.stack([frames[0], frames[5], frames[-1]]).transpose(0, 3, 1, 2).astype(int)
        assert np.abs(clip.numpy().astype(int) - ref).mean() < 8   # rawframes: JPEG of the decoded frames


def test_determinism_and_seeds(tiny, tmp_path):
    # same seed, in worker processes this time: identical lists and identical decoded frames (and bytes)
    again = make_synthetic_dataset(tmp_path / 'b', seed=0, n_workers=2, **TINY)
    for f in ('train_list.txt', 'val_list.txt', 'train_rawframes.txt', 'val_rawframes.txt', 'classes.txt'):
        assert (tiny.root / f).read_text() == (again.root / f).read_text()
    for a, b in zip(tiny.items[::4], again.items[::4]):
        assert np.array_equal(_decode(a.video), _decode(b.video))
        assert a.video.read_bytes() == b.video.read_bytes()
    other = make_synthetic_dataset(tmp_path / 'c', seed=1, rawframes=False, **TINY)
    assert other.train_rawframes is None and not (other.root / 'rawframes').exists()
    diff = 0
    for a, b in zip(tiny.items, other.items):
        fa, fb = _decode(a.video), _decode(b.video)
        diff += fa.shape != fb.shape or not np.array_equal(fa, fb)
    assert diff == len(tiny.items)


def test_class_subset_and_flip_map(tiny, tmp_path):
    sub = make_synthetic_dataset(tmp_path / 's', seed=0, classes=['moving_right', 'square', 'moving_left'],
                                 rawframes=False, **TINY)
    assert sub.classes == ['moving_right', 'square', 'moving_left'] and sub.flip_label_map == {0: 2, 2: 0}
    labels = {l.split()[0]: int(l.split()[1]) for l in sub.train_list.read_text().splitlines()}
    assert labels == {'videos/moving_right/moving_right_0000.mp4': 0, 'videos/square/square_0000.mp4': 1,
                      'videos/moving_left/moving_left_0000.mp4': 2}
    full = {it.name: it for it in tiny.items}
    assert all(it.video.read_bytes() == full[it.name].video.read_bytes() for it in sub.items)
    assert all(SYNTH_CLASSES[SYNTH_FLIP_LABEL_MAP[i]] != c for i, c in enumerate(SYNTH_CLASSES) if i in SYNTH_FLIP_LABEL_MAP)


def test_rerun_overwrites_cleanly(tmp_path):
    a = make_synthetic_dataset(tmp_path, seed=0, classes=['circle'], n_per_class=1, size=(64, 80), num_frames=(20, 20))
    assert len(list(a.items[0].frames.iterdir())) == 20
    b = make_synthetic_dataset(tmp_path, seed=0, classes=['circle'], n_per_class=1, size=(64, 80), num_frames=(5, 5))
    assert len(list(b.items[0].frames.iterdir())) == 5 == len(_decode(b.items[0].video))
    assert b.val_list.read_text() == ''   # one video per class: all in train
    assert not [p for p in tmp_path.rglob('*') if '.tmp' in p.name]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='unknown synthetic classes'): make_synthetic_dataset(tmp_path, classes=['x'])
    with pytest.raises(ValueError, match='even'): make_synthetic_dataset(tmp_path, size=(64, 81))
    with pytest.raises(ValueError, match='num_frames'): make_synthetic_dataset(tmp_path, num_frames=1)
    with pytest.raises(ValueError, match='valid_pct'): make_synthetic_dataset(tmp_path, valid_pct=1.0)
    assert not list(tmp_path.iterdir())
