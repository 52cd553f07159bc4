"End-to-end and failure tests for vidkit.inference: URLs, frame folders, long videos, checkpoints, exported learners, ONNX."
import functools, http.server, json, os, subprocess, sys, threading, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vidkit.core import VideoDecodeError
from vidkit.datasets import VideoRecord
from vidkit.encode import make_test_video, moving_gradient
from vidkit.readers import VideoReader
from vidkit.models import create_video_model
from vidkit.sampling import SampleFrames
from vidkit.data import VideoDataLoaders, sampler_to_cfg
from vidkit.learner import video_learner
from vidkit.checkpoint import CheckpointCallback
from vidkit.views import evaluate_views
from vidkit.inference import Recognizer, default_data_cfg, export_onnx, load_recognizer, predict_video, save_recognizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
VOCAB = ['walk', 'run', 'jump']
CFG = dict(sampler=sampler_to_cfg(SampleFrames(1, num_clips=4, test_mode=True)), short_side=40, size=32,
           mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], backend='auto', multi_label=False)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "Six tiny training videos, a test video and a 400-frame 'long' video."
    root = tmp_path_factory.mktemp('inference')
    for i in range(6): make_test_video(root/f'train/v{i}.mp4', num_frames=12 + 2 * i, size=(36, 44))
    make_test_video(root/'clip.mp4', num_frames=40, size=(48, 64))
    make_test_video(root/'long.mp4', num_frames=400, size=(32, 40))
    return root


@pytest.fixture(scope='module')
def learn(data):
    "A tsn_r18 trained for one epoch (a few steps) on the tiny videos, with a checkpoint written by CheckpointCallback."
    recs = [VideoRecord(data/f'train/v{i}.mp4', i % 3) for i in range(6)]
    dls = VideoDataLoaders.from_records(recs[:4], recs[4:] + recs[:1], VOCAB, SampleFrames(1, num_clips=4), size=32,
                                        short_side=36, bs=2, num_workers=0, seed=0, path=data, decode_resize=False)
    lrn = video_learner(dls, 'tsn_r18')
    with lrn.no_bar(), lrn.no_logging(): lrn.fit(1, 1e-3, cbs=CheckpointCallback())
    return lrn


@pytest.fixture
def server(tmp_path, monkeypatch):
    "A loopback HTTP server for `tmp_path/www`; downloads cached under tmp_path. Yields (base_url, folder, hits)."
    www = tmp_path/'www'; www.mkdir()
    hits = []
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            hits.append(self.path); return super().do_GET()
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv('VIDKIT_CACHE', str(tmp_path/'cache'))
    yield f'http://127.0.0.1:{srv.server_address[1]}', www, hits
    srv.shutdown(); srv.server_close()


def _same(p, q, atol=1e-5):
    "Two predictions `[(label, score)]` agree: same labels in the same order, scores within `atol` (exact on CPU)."
    return [l for l, _ in p] == [l for l, _ in q] and np.allclose([s for _, s in p], [s for _, s in q], atol=atol, rtol=0)


def _tsn(n=3, seed=0):
    torch.manual_seed(seed)
    return create_video_model('tsn_r18', n, num_segments=4)


def test_url_prediction_matches_local_file(data, server):
    base, www, hits = server
    (www/'clip.mp4').write_bytes((data/'clip.mp4').read_bytes())
    rec = Recognizer(_tsn(), VOCAB, CFG)
    url = f'{base}/clip.mp4'
    p_url, p_file = rec(url, topk=3), rec(data/'clip.mp4', topk=3)
    assert p_url == p_file and [l for l, _ in p_url] != [] and hits == ['/clip.mp4']
    assert predict_video(rec, url, topk=2) == p_file[:2] and hits == ['/clip.mp4']       # second time from the cache


def test_url_that_fails_names_the_url(server):
    base, _, _ = server
    rec = Recognizer(_tsn(), VOCAB, CFG)
    with pytest.raises(VideoDecodeError, match=r'127\.0\.0\.1.*/missing\.mp4.*404'):
        predict_video(rec, f'{base}/missing.mp4')


def test_missing_and_broken_videos(tmp_path):
    rec = Recognizer(_tsn(), VOCAB, CFG)
    with pytest.raises(VideoDecodeError, match='nope.mp4: no such file'): rec(tmp_path/'nope.mp4')
    (tmp_path/'junk.mp4').write_bytes(os.urandom(5000))
    with pytest.raises(VideoDecodeError, match='junk.mp4'): rec(tmp_path/'junk.mp4')
    (tmp_path/'empty_dir').mkdir()
    with pytest.raises(VideoDecodeError, match='empty_dir'): rec(tmp_path/'empty_dir')


def test_rawframe_folder(tmp_path, data):
    from PIL import Image
    d = tmp_path/'frames'; d.mkdir()
    for t in range(40): Image.fromarray(moving_gradient(t, 48, 64)).save(d/f'img_{t + 1:05}.jpg', quality=95)
    rec = Recognizer(_tsn(), VOCAB, CFG)
    asked, orig = [], VideoReader.get_frames
    def spy(self, indices):
        asked.append((self.backend, list(np.asarray(indices)))); return orig(self, indices)
    VideoReader.get_frames = spy
    try: p = predict_video(rec, d, topk=None)
    finally: VideoReader.get_frames = orig
    assert asked == [('frames', list(SampleFrames(1, num_clips=4, test_mode=True)(40)))]
    assert len(p) == 3 and abs(sum(s for _, s in p) - 1) < 1e-5
    assert (rec.scores(d) - rec.scores(data/'clip.mp4')).abs().max() < 0.05        # the same frames, as JPEGs


@pytest.mark.parametrize('backend', ['decord', 'pyav'])
def test_long_video_reads_only_sampled_frames(data, backend):
    "The reader is asked for the sampled frames only, picked from the header's frame count; views add clips, not frames."
    r3d = create_video_model('r3d_18', 3)
    cfg = default_data_cfg(r3d).replace(short_side=32, size=32, backend=backend,
                                        sampler=sampler_to_cfg(SampleFrames(clip_len=4, frame_interval=2, num_clips=1, test_mode=True)))
    rec = Recognizer(r3d, VOCAB, cfg)
    asked, orig = [], VideoReader.get_frames
    def spy(self, indices):
        asked.append((self.backend, self.num_frames, np.asarray(indices).copy())); return orig(self, indices)
    VideoReader.get_frames = spy
    try:
        rec(data/'long.mp4')
        rec(data/'long.mp4', views=(3, 1))
    finally: VideoReader.get_frames = orig
    (b1, n1, i1), (b2, n2, i2) = asked
    assert b1 == b2 == backend and n1 == n2 == 400
    assert list(i1) == list(SampleFrames(4, 2, num_clips=1, test_mode=True)(400)) and len(i1) == 4
    assert list(i2) == list(SampleFrames(4, 2, num_clips=3, test_mode=True)(400)) and len(i2) == 12
    assert i2.max() > 300                                                              # spread over the whole video
    assert rec.load_views(data/'long.mp4', views=(3, 1)).shape == (3, 4, 3, 32, 32)


def test_checkpoint_round_trip_identical_logits(learn, tmp_path, data):
    path = save_recognizer(learn, tmp_path/'rec.pth')
    assert not [p for p in tmp_path.iterdir() if p.name != 'rec.pth']               # atomic: no temp file left
    m = learn.model.eval()
    dev = next(m.parameters()).device
    rec = load_recognizer(path, device=dev)
    assert rec.vocab == VOCAB and rec.arch == 'tsn_r18' and rec.data_cfg.size == 32 and not rec.model.training
    x = torch.randn(2, 4, 3, 32, 32, device=dev)
    with torch.no_grad(): assert torch.equal(rec.model(x), m(x))
    assert torch.equal(rec.scores(data/'clip.mp4'), Recognizer.from_learner(learn).scores(data/'clip.mp4'))
    assert predict_video(str(path), data/'clip.mp4', device=dev) == predict_video(learn, data/'clip.mp4')
    assert _same(predict_video(str(path), data/'clip.mp4', device='cpu'), predict_video(learn, data/'clip.mp4'))
    # the checkpoint the training callback wrote is a recognizer too
    last = load_recognizer(data/'models/last.pth', device=dev)
    with torch.no_grad(): assert torch.equal(last.model(x), m(x))
    assert last.vocab == VOCAB and last.data_cfg == rec.data_cfg


def test_multi_view_agrees_with_evaluate_views(learn, data):
    rec = Recognizer.from_learner(learn)
    for views in [(2, 3), (1, 1), (3, 10)]:
        res = evaluate_views(learn, [VideoRecord(data/'clip.mp4', 0)], num_clips=views[0], num_crops=views[1])
        assert torch.allclose(res.scores[0], rec.scores(data/'clip.mp4', views=views), atol=1e-5), views


def test_learner_without_data_cfg_predicts_with_its_validation_pipeline(learn, data, tmp_path):
    "DataLoaders that lost their data_cfg (as fastai's export does with new_empty) still give the validation recipe."
    cfg = learn.dls.data_cfg
    try:
        learn.dls.data_cfg = None
        r = Recognizer.from_learner(learn)
        with pytest.warns(UserWarning, match='no data_cfg'): save_recognizer(learn, tmp_path/'nocfg.pth')
    finally: learn.dls.data_cfg = cfg
    assert r.data_cfg is None and r.vocab == VOCAB
    assert _same(r(data/'clip.mp4'), predict_video(learn, data/'clip.mp4'))      # the same frames and crops
    with pytest.raises(ValueError, match='views= needs a data_cfg'): r(data/'clip.mp4', views=(2, 1))
    import onnxruntime as ort
    sess = ort.InferenceSession(str(export_onnx(r, tmp_path/'r.onnx')), providers=['CPUExecutionProvider'])
    assert sess.get_inputs()[0].shape[1:] == [4, 3, 32, 32]
    assert load_recognizer(tmp_path/'nocfg.pth', 'cpu').data_cfg == default_data_cfg(learn.model)


_LOAD_AND_PREDICT = """
import json, sys, warnings
warnings.simplefilter('ignore')
import torch; torch.set_num_threads(1)
from fastai.learner import load_learner
from vidkit.inference import predict_video, load_recognizer
learn = load_learner(sys.argv[1], cpu=True)
print(json.dumps([predict_video(learn, sys.argv[2], topk=None), load_recognizer(sys.argv[1], 'cpu')(sys.argv[2], topk=None)]))
"""

def test_export_and_load_learner_in_process_and_fresh_process(learn, data, tmp_path):
    from fastai.learner import load_learner
    learn.export(tmp_path/'export.pkl')
    expected = predict_video(learn, data/'clip.mp4', topk=None)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        l2 = load_learner(tmp_path/'export.pkl', cpu=True)
    assert l2.dls.vocab == VOCAB and _same(predict_video(l2, data/'clip.mp4', topk=None), expected)
    assert _same(load_recognizer(tmp_path/'export.pkl', 'cpu')(data/'clip.mp4', topk=None), expected)
    r = subprocess.run([sys.executable, '-c', _LOAD_AND_PREDICT, str(tmp_path/'export.pkl'), str(data/'clip.mp4')],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(_same(g, expected) for g in got), (got, expected)


def test_bad_checkpoints_are_refused_with_the_path(tmp_path, learn):
    with pytest.raises(FileNotFoundError, match='absent.pth: no such checkpoint'): load_recognizer(tmp_path/'absent.pth')
    with pytest.raises(IsADirectoryError, match='is a folder'): load_recognizer(tmp_path)
    torch.save([1, 2, 3], tmp_path/'list.pth')
    with pytest.raises(ValueError, match='list.pth: not a vidkit checkpoint'): load_recognizer(tmp_path/'list.pth')
    torch.save(_tsn().state_dict(), tmp_path/'sd.pth')
    with pytest.raises(ValueError, match=r"sd.pth: not a vidkit checkpoint.*pretrained="): load_recognizer(tmp_path/'sd.pth')
    (tmp_path/'text.pth').write_text('hello')
    with pytest.raises(ValueError, match='text.pth: cannot be read'): load_recognizer(tmp_path/'text.pth')
    learn.export(tmp_path/'export.pth')                                          # a pickle under a checkpoint's name
    with pytest.raises(ValueError, match=r'export.pth: is an exported fastai Learner.*\.pkl'): load_recognizer(tmp_path/'export.pth')
    (tmp_path/'bad.pkl').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match='bad.pkl: cannot be loaded as an exported fastai learner'): load_recognizer(tmp_path/'bad.pkl')
    ck = torch.load(save_recognizer(learn, tmp_path/'ok.pth'), weights_only=True)
    for key, val, msg in [('arch', None, "has no 'arch'"), ('arch', 'no_such_model', "cannot rebuild model 'no_such_model'"),
                          ('num_classes', 7, 'the weights do not fit'), ('data_cfg', {'size': 3}, "clip recipe has no 'sampler'")]:
        torch.save({**ck, key: val}, tmp_path/f'{key}.pth')
        with pytest.raises(ValueError, match=f"{key}.pth: .*{msg}"): load_recognizer(tmp_path/f'{key}.pth')


def _rescale_head(model, std=1.0):
    "Give the head large weights so that logits are O(1) and the parity check means something."
    torch.manual_seed(1)
    nn.init.normal_(model.head.fc.weight, std=std)
    return model


@pytest.mark.parametrize('name', ['tsn_r18', 'tsm_r18', 'r3d_18'])
def test_onnx_parity(name, tmp_path):
    import onnx, onnxruntime as ort
    kw = dict(num_segments=4) if name.startswith('ts') else {}
    torch.manual_seed(0)
    model = _rescale_head(create_video_model(name, 5, **kw)).eval()
    cfg = dict(CFG, sampler=sampler_to_cfg(SampleFrames(1, num_clips=4, test_mode=True) if kw else
                                           SampleFrames(4, 2, num_clips=1, test_mode=True)))
    rec = Recognizer(model, [f'c{i}' for i in range(5)], cfg)
    path = export_onnx(rec, tmp_path/f'{name}.onnx')
    onnx.checker.check_model(onnx.load(path))
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    inp = sess.get_inputs()[0]
    assert inp.name == 'clips' and inp.shape[1:] == [4, 3, 32, 32] and not isinstance(inp.shape[0], int)   # dynamic batch
    x = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): ref = model(x).numpy()
    got = sess.run(None, {'clips': x.numpy()})[0]
    assert np.abs(ref).max() > 0.1 and np.abs(got - ref).max() < 1e-4
    assert not model.training and not [p for p in tmp_path.iterdir() if p.suffix == '.tmp']


def test_onnx_static_batch_from_checkpoint_path(tmp_path):
    import onnxruntime as ort
    p = save_recognizer(_rescale_head(_tsn()), tmp_path/'m.pth', vocab=VOCAB, data_cfg=CFG)
    out = export_onnx(str(p), tmp_path/'m.onnx', dynamic_batch=False)
    sess = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    assert sess.get_inputs()[0].shape == [1, 4, 3, 32, 32]


def test_onnx_verification_failure_leaves_no_file(tmp_path, monkeypatch):
    "A graph onnxruntime disagrees with is not put in place."
    import vidkit.inference as vi
    class Odd(nn.Module):
        "Differs between export (traced with one input) and eager runs: the check must catch it."
        def __init__(self):
            super().__init__(); self.fc = nn.Linear(3, 2); self.calls = 0
            self.default_cfg = dict(kind='3d', clip_len=2, input_size=8, resize=8, mean=(0.5,) * 3, std=(0.5,) * 3)
        def forward(self, x):
            self.calls += 1
            return self.fc(x.mean((1, 3, 4))) * self.calls
    with pytest.raises(RuntimeError, match='disagree'): export_onnx(Odd(), tmp_path/'odd.onnx')
    assert not list(tmp_path.iterdir())
