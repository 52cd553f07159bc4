"Reliability and integration tests for vidkit.models: downloads, bad checkpoints, pickling, fastai training with the splitter."
import functools, http.server, pickle, threading, warnings
from pathlib import Path

import pytest
import torch
from torch import nn
import torchvision

from vidkit.backbones import BACKBONES, register_backbone, temporal_shift
from vidkit.weights import CheckpointError, LoadReport, load_pretrained
from vidkit.models import TSM, TSN, create_video_model, list_models, register_model, tsm_param_groups, video_splitter

torch.set_num_threads(1)


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    hits = []
    def log_message(self, *a): pass
    def do_GET(self):
        type(self).hits.append(self.path)
        return super().do_GET()


@pytest.fixture
def server(tmp_path):
    "A loopback HTTP server serving `tmp_path/www`; yields (base_url, folder, hits)."
    www = tmp_path / 'www'; www.mkdir()
    _CountingHandler.hits = []
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_CountingHandler, directory=str(www)))
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    yield f'http://127.0.0.1:{srv.server_address[1]}', www, _CountingHandler.hits
    srv.shutdown(); srv.server_close()


@pytest.fixture(scope='module')
def r18_sd():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_url_downloaded_once_into_cache(server, tmp_path, r18_sd, monkeypatch):
    base, www, hits = server
    torch.save(r18_sd, www / 'resnet18-abc.pth')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))   # default cache = torch hub dir
    m = create_video_model('tsn_r18', 5, pretrained=f'{base}/resnet18-abc.pth')
    assert len(m.pretrained_report.loaded) == 120 and m.pretrained_report.source.startswith('http://127.0.0.1')
    assert (tmp_path / 'hub' / 'checkpoints' / 'resnet18-abc.pth').exists()
    m2 = create_video_model('tsn_r18', 5, pretrained=f'{base}/resnet18-abc.pth')
    assert hits == ['/resnet18-abc.pth']                                        # second time from the cache
    assert torch.equal(m2.backbone.conv1.weight, r18_sd['conv1.weight'])


def test_url_hash_check(server, tmp_path, r18_sd):
    base, www, _ = server
    torch.save(r18_sd, www / 'r18-deadbeef.pth')
    with pytest.raises(CheckpointError, match='download failed'):
        load_pretrained(TSN(5, 'resnet18'), f'{base}/r18-deadbeef.pth', cache_dir=tmp_path / 'c', check_hash=True)
    assert not list((tmp_path / 'c').iterdir())                                 # nothing half-written left behind
    with pytest.raises(CheckpointError, match='carries no'):
        load_pretrained(TSN(5, 'resnet18'), f'{base}/r18.pth', cache_dir=tmp_path / 'c', check_hash=True)


def test_url_errors_name_the_url(server, tmp_path):
    base, _, _ = server
    with pytest.raises(CheckpointError) as e:
        load_pretrained(TSN(5, 'resnet18'), f'{base}/none.pth', cache_dir=tmp_path / 'c')
    assert str(e.value).startswith(f'{base}/none.pth: download failed') and not list((tmp_path / 'c').iterdir())


@pytest.mark.parametrize('content,err,msg', [
    (b'', CheckpointError, 'not a PyTorch checkpoint'),
    (b'\x00' * 100, CheckpointError, 'not a PyTorch checkpoint'),
    (b'garbage that is not a pickle', CheckpointError, 'not a PyTorch checkpoint')])
def test_bad_files(tmp_path, content, err, msg):
    p = tmp_path / 'bad.pth'; p.write_bytes(content)
    with pytest.raises(err, match=msg) as e:
        load_pretrained(TSN(5, 'resnet18'), p)
    assert str(p) in str(e.value)


def test_missing_and_dir_and_non_dict(tmp_path):
    m = TSN(5, 'resnet18')
    with pytest.raises(FileNotFoundError, match='nope.pth: no such checkpoint file'): load_pretrained(m, tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match='is a directory'): load_pretrained(m, tmp_path)
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='holds a list'): load_pretrained(m, tmp_path / 'list.pth')
    torch.save({'meta': {'epoch': 1}}, tmp_path / 'meta.pth')
    with pytest.raises(CheckpointError, match='no tensors found'): load_pretrained(m, tmp_path / 'meta.pth')


def test_mmaction_checkpoint_with_python_objects_is_refused_clearly(tmp_path):
    import argparse
    torch.save({'meta': {}, 'state_dict': TSN(5, 'resnet18').state_dict(), 'message_hub': argparse.Namespace(a=1)}, tmp_path / 'mm.pth')
    with pytest.raises(CheckpointError, match='weights_only=True') as e:
        load_pretrained(TSN(5, 'resnet18'), tmp_path / 'mm.pth')
    assert 'mm.pth' in str(e.value) and "torch.save(sd, 'weights.pth')" in str(e.value)


def test_mismatch_raises_before_touching_the_model(tmp_path):
    src = TSN(400, 'resnet18'); dst = TSN(5, 'resnet18')
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r'head\.fc\.weight \(400, 512\)->\(5, 512\)'):
        load_pretrained(dst, src.state_dict(), skip_mismatch=False)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_ddp_prefix_and_fastai_checkpoint(tmp_path):
    src = TSM(5, 'resnet18', num_segments=4)
    torch.save({'model': {'module.' + k: v for k, v in src.state_dict().items()}, 'opt': {'hypers': [{'lr': 0.1}]}}, tmp_path / 'ddp.pth')
    rep = load_pretrained(TSM(5, 'resnet18', num_segments=4), tmp_path / 'ddp.pth')
    assert rep.format == 'vidkit' and len(rep.loaded) == len(src.state_dict()) and not rep.missing


def test_report_repr_is_readable(r18_sd):
    rep = load_pretrained(TSN(5, 'resnet18'), r18_sd)
    text = repr(rep)
    assert 'loaded:     120' in text and 'unexpected: 2  [fc.weight, fc.bias]' in text and 'missing:    2' in text
    assert str(rep) == text and isinstance(pickle.loads(pickle.dumps(rep)), LoadReport)


def test_models_pickle_and_errors_pickle():
    m = create_video_model('tsm_r18', 3, num_segments=4).eval()
    m2 = pickle.loads(pickle.dumps(m))
    x = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad(): assert torch.equal(m(x), m2(x))
    assert m2.default_cfg == m.default_cfg
    e = pickle.loads(pickle.dumps(CheckpointError('a.pth', 'bad')))
    assert str(e) == 'a.pth: bad'


def test_temporal_shift_gradients():
    x = torch.randn(2 * 4, 16, 2, 2, requires_grad=True)
    temporal_shift(x, 4).sum().backward()
    g = x.grad.view(2, 4, 16, 2, 2)
    # channels 0:2 feed the previous frame, so the first frame's are never used; channels 2:4 the next frame
    assert (g[:, 0, :2] == 0).all() and (g[:, 1:, :2] == 1).all() and (g[:, -1, 2:4] == 0).all() and (g[:, :, 4:] == 1).all()


def test_fastai_training_with_splitter_and_freeze():
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.losses import CrossEntropyLossFlat
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
    from fastai.torch_core import TensorBase
    torch.manual_seed(0)
    xs = TensorBase(torch.randn(8, 4, 3, 32, 32)); ys = torch.randint(0, 3, (8,))
    ds = list(zip(xs, ys))
    dls = DataLoaders(DataLoader(ds, bs=4, shuffle=True), DataLoader(ds, bs=4), device='cpu')
    model = create_video_model('tsm_r18', 3, num_segments=4)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), splitter=video_splitter)
    learn.freeze()
    conv_before = model.backbone.conv1.weight.detach().clone(); fc_before = model.head.fc.weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert torch.equal(model.backbone.conv1.weight, conv_before) and not torch.equal(model.head.fc.weight, fc_before)
    assert len(learn.opt.param_groups) == 2
    out = model.eval()(xs[:2])
    assert type(out) is torch.Tensor and out.shape == (2, 3)     # fastai tensor subclasses are stripped at the input


def test_param_groups_build_an_optimizer():
    m = create_video_model('tsm_r18', 3, num_segments=4)
    groups = tsm_param_groups(m)
    opt = torch.optim.SGD([dict(params=g['params'], lr=0.01 * g['lr_mult'], weight_decay=1e-4 * g['wd_mult']) for g in groups], lr=0.01)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(m.parameters()))
    assert video_splitter(nn.DataParallel(m))[1] == [m.head.fc.weight, m.head.fc.bias]
    assert len(tsm_param_groups(nn.DataParallel(m))) == len(groups)


def test_registry_replacement_warns_and_user_model(tmp_path):
    @register_backbone('_pt_tiny')
    def _pt_tiny(): return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU()), 4, '2d'
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            register_backbone('_pt_tiny')(_pt_tiny)                               # re-running a cell: silent
        with pytest.warns(UserWarning, match='already registered'):
            register_backbone('_pt_tiny')(lambda: (nn.Identity(), 3, '2d'))
        with pytest.warns(UserWarning, match='already registered'):
            register_backbone('_pt_tiny')(_pt_tiny)
        with pytest.raises(ValueError, match="returned kind '4d'"):
            register_backbone('_pt_bad')(lambda: (nn.Identity(), 3, '4d')); TSN(2, '_pt_bad')
        m = create_video_model('tsn', 2, backbone='_pt_tiny')
        torch.save({'model': m.state_dict()}, tmp_path / 'tiny.pth')
        rep = load_pretrained(create_video_model('tsn', 2, backbone='_pt_tiny'), tmp_path / 'tiny.pth')
        assert len(rep.loaded) == 4 and not rep.missing
    finally:
        for n in ('_pt_tiny', '_pt_bad'): BACKBONES.remove(n)
    with pytest.raises(ValueError, match='unknown backbone'): TSN(2, '_pt_tiny')


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError) as e: create_video_model('i3d_r5O', 3)
    assert "'i3d_r50'" in str(e.value) and 'list_models()' in str(e.value)
    assert list_models('r*_18') == ['r2plus1d_18', 'r3d_18']
