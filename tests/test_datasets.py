"End-to-end tests of vidkit.datasets on real encoded videos: DataLoader workers, bad files, check_videos."
import pickle, warnings
from pathlib import Path
import pytest, torch
from torch.utils.data import DataLoader
from vidkit.core import VideoDecodeError, TensorClip, worker_init
from vidkit.encode import make_test_video
from vidkit.sampling import SampleFrames
from vidkit.datasets import (VideoRecord, VideoDataset, RepeatDataset, check_videos, read_video_list)

SIZE = (32, 40)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "6 good videos in 2 classes (listed in a video list), a corrupt one, an empty one and a short one."
    root = tmp_path_factory.mktemp('ds')
    lines = []
    for k in range(6):
        name = f"{'left' if k % 2 == 0 else 'right'}/v{k}.mp4"
        make_test_video(root/name, num_frames=20 + 2 * k, size=SIZE)
        lines.append(f"{name} {k % 2}")
    (root/'train.txt').write_text('\n'.join(lines) + '\n')
    (root/'corrupt.mp4').write_bytes(b'\x00\x00\x00\x18ftypisom' + bytes(range(256)) * 8)
    (root/'empty.mp4').touch()
    make_test_video(root/'short.mp4', num_frames=2, size=SIZE)
    recs, vocab = read_video_list(root/'train.txt', data_root=root, classes=['left', 'right'])
    return root, recs, vocab

def with_corrupt(data, at=2):
    root, recs, vocab = data
    return recs[:at] + [VideoRecord(root/'corrupt.mp4', 1)] + recs[at:], vocab

def loader(ds, workers=2, **kw):
    return DataLoader(ds, batch_size=2, num_workers=workers, worker_init_fn=worker_init, timeout=120, **kw)

def test_train_and_test_shapes(data):
    _, recs, vocab = data
    train = VideoDataset(recs, SampleFrames(clip_len=4, frame_interval=2), vocab=vocab)
    clip, label = train[0]
    assert isinstance(clip, TensorClip) and clip.dtype == torch.uint8 and clip.shape == (4, 3, *SIZE)
    assert int(label) == 0 and train.split_idx == 0
    test = VideoDataset(recs, SampleFrames(clip_len=4, frame_interval=2, num_clips=3, test_mode=True), vocab=vocab)
    clip, label = test[3]
    assert clip.shape == (3, 4, 3, *SIZE) and int(label) == 1 and test.split_idx == 1
    # test mode is deterministic; train mode draws new clips (seeded through torch)
    assert torch.equal(test[3][0], test[3][0])
    torch.manual_seed(0); a = [train[5][0] for _ in range(4)]
    torch.manual_seed(0); b = [train[5][0] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(a[0], x) for x in a[1:])

def test_dataloader_workers_batches(data):
    _, recs, vocab = data
    ds = VideoDataset(recs, SampleFrames(clip_len=4, num_clips=2, test_mode=True), vocab=vocab)
    batches = list(loader(ds))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (2, 2, 4, 3, *SIZE) and y.tolist() == [0, 1]

def test_raise_reaches_main_process(data):
    recs, vocab = with_corrupt(data)
    ds = VideoDataset(recs, SampleFrames(4), vocab=vocab)
    bad = str(data[0]/'corrupt.mp4')
    with pytest.raises(VideoDecodeError) as ei:
        for _ in loader(ds): pass
    assert bad in str(ei.value) and ei.value.path == bad
    # the same error in the main process (no workers), and it pickles
    with pytest.raises(VideoDecodeError) as ei:
        ds[2]
    assert ei.value.path == bad and str(ei.value).startswith(bad + ': ')
    e2 = pickle.loads(pickle.dumps(ei.value))
    assert isinstance(e2, VideoDecodeError) and str(e2) == str(ei.value)

def test_skip_in_forked_workers(data):
    recs, vocab = with_corrupt(data)
    ds = VideoDataset(recs, SampleFrames(4, test_mode=True), vocab=vocab, on_error='skip')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ys = torch.cat([y for _, y in loader(ds)])
    assert len(ys) == len(recs) == 7
    assert ys[2] == recs[3].label            # the corrupt item 2 was replaced by item 3
    assert ds.n_skipped == 1 and ds.bad_files == [str(data[0]/'corrupt.mp4')]

def test_skip_warns_once_per_file(data):
    recs, vocab = with_corrupt(data)
    ds = VideoDataset(recs, SampleFrames(4), vocab=vocab, on_error='skip')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        for _ in range(3): ds[2]
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and 'corrupt.mp4' in msgs[0], msgs
    assert ds.n_skipped == 3

def test_skip_in_spawned_worker(data):
    "Counts also come back from a spawned worker (the dataset is pickled into it with its shared counters)."
    recs, vocab = with_corrupt(data, at=0)
    ds = VideoDataset(recs[:3], SampleFrames(2, test_mode=True), vocab=vocab, on_error='skip')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        n = sum(len(y) for _, y in loader(ds, workers=1, multiprocessing_context='spawn'))
    assert n == 3 and ds.n_skipped == 1 and ds.bad_files == [str(data[0]/'corrupt.mp4')]

def test_all_bad_raises_instead_of_looping(data):
    root = data[0]
    recs = [VideoRecord(root/'corrupt.mp4', 0), VideoRecord(root/'empty.mp4', 1), VideoRecord(root/'nope.mp4', 0)]
    ds = VideoDataset(recs, SampleFrames(4), on_error='skip')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(VideoDecodeError, match='no other video of the 3 in the dataset could be read'):
            for _ in loader(ds, workers=1): pass

def test_repeat_dataset(data):
    _, recs, vocab = data
    ds = RepeatDataset(VideoDataset(recs, SampleFrames(2, test_mode=True), vocab=vocab), times=3)
    assert len(ds) == 18 and ds.vocab == vocab
    ys = torch.cat([y for _, y in loader(ds)])
    assert ys.tolist() == [0, 1] * 9
    assert torch.equal(ds[7][0], ds.ds[1][0])

def test_fastai_decode_batch(data):
    "fastai's TfmdDL calls `dataset.decode(item, full=...)` in show_batch/decode_batch."
    from fastai.data.core import TfmdDL
    _, recs, vocab = data
    dl = TfmdDL(VideoDataset(recs, SampleFrames(2, test_mode=True), vocab=vocab), bs=2)
    items = dl.decode_batch(dl.one_batch())
    assert [str(lbl) for _, lbl in items] == ['left', 'right']
    assert all(isinstance(c, TensorClip) and c.shape == (2, 3, *SIZE) for c, _ in items)

def test_check_videos_finds_bad_ones(data):
    root, recs, _ = data
    mixed = recs[:3] + [VideoRecord(root/'corrupt.mp4'), VideoRecord(root/'empty.mp4'),
                        VideoRecord(root/'short.mp4'), VideoRecord(root/'missing.mp4')] + recs[3:]
    df = check_videos(mixed, min_frames=8, num_workers=2, progress=False, verbose=False)
    assert list(df.path) == [str(r.path) for r in mixed]
    assert list(df.status) == ['ok'] * 3 + ['unreadable', 'empty', 'too_short', 'unreadable'] + ['ok'] * 3
    assert df.num_frames[5] == 2 and df.num_frames[0] == 20
    assert 'no such file' in df.reason[6]

def test_with_vidkit_transforms(data):
    "Item transforms from vidkit.transforms: train crops/flip (split_idx 0), test ThreeCrop multiplying the views."
    from vidkit.transforms import Resize, RandomCrop, CenterCrop, ThreeCrop, Flip
    _, recs, vocab = data
    train = VideoDataset(recs, SampleFrames(4), [Resize(28), RandomCrop(24), Flip(p=1., flip_label_map={0: 1, 1: 0})], vocab=vocab)
    clip, label = train[0]
    assert clip.shape == (4, 3, 24, 24) and int(label) == 1       # flipped, so the direction label is swapped
    valid = VideoDataset(recs, SampleFrames(4), [Resize(28), CenterCrop(24), Flip(p=1., flip_label_map={0: 1, 1: 0})],
                         vocab=vocab, split_idx=1)
    assert int(valid[0][1]) == 0                                   # Flip is train-only
    test = VideoDataset(recs, SampleFrames(4, num_clips=2, test_mode=True), [Resize(24), ThreeCrop(24)], vocab=vocab)
    clip, label = test[1]
    assert clip.shape == (6, 4, 3, 24, 24) and int(label) == 1     # 2 clips x 3 crops
    assert test.decode((clip, label))[1] == 'right'
