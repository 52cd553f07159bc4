"Download path of vidkit.zoo without internet: a loopback server serves checkpoints the tests make, in torchvision's and MMAction2 1.x's layouts."
import functools, hashlib, http.server, re, socket, threading
from pathlib import Path

import pytest
import torch
import torchvision

from vidkit.models import create_video_model
from vidkit.zoo import (PretrainedWeights, WeightsDownloadError, clip_recipe, download_weights, get_pretrained,
                        register_pretrained, unregister_pretrained, weights_path, WEIGHTS_MIRROR_ENV)
from vidkit.inference import load_recognizer
from vidkit.synth import make_synthetic_dataset

torch.set_num_threads(1)


class _Handler(http.server.SimpleHTTPRequestHandler):
    "Serves a folder with HTTP Range support; `cut_after` bytes: the first full (non-Range) response stops there."
    hits, cut_after = [], None
    def log_message(self, *a): pass
    def do_GET(self):
        path = Path(self.directory) / self.path.lstrip('/')
        type(self).hits.append((self.path, self.headers.get('Range')))
        if not path.is_file(): return self.send_error(404)
        data = path.read_bytes()
        m = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
        start = int(m.group(1)) if m else 0
        self.send_response(206 if m else 200)
        if m: self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if not m and type(self).cut_after is not None:        # a connection that drops mid-file
            self.wfile.write(body[:type(self).cut_after]); self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    www = tmp_path / 'www'; www.mkdir()
    _Handler.hits, _Handler.cut_after = [], None
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Handler, directory=str(www)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}', www
    srv.shutdown(); srv.server_close()


@pytest.fixture
def entries():
    names = []
    def add(e): names.append(register_pretrained(e, overwrite=True).name); return e
    yield add
    for n in names: unregister_pretrained(n)


def _publish(obj, www:Path, stem:str) -> str:
    "Save `obj` under `www` with torch hub's '<stem>-<sha256 prefix>.pth' name; return the file name."
    tmp = www / f'{stem}.tmp'
    torch.save(obj, tmp)
    name = f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(www / name)
    return name


def _to_mmaction2(sd):
    "vidkit TSN/TSM keys -> MMAction2 1.x ConvModule keys (what its checkpoints hold)."
    out = {}
    for k, v in sd.items():
        if k.startswith('head.fc.'): out['cls_head.fc_cls.' + k[8:]] = v; continue
        k = re.sub(r'\.downsample\.0\.', '.downsample.conv.', k)
        k = re.sub(r'\.downsample\.1\.', '.downsample.bn.', k)
        k = re.sub(r'\.conv(\d)\.net\.weight$', r'.conv\1.conv.net.weight', k)
        k = re.sub(r'\.conv(\d)\.weight$', r'.conv\1.conv.weight', k)
        k = re.sub(r'\.bn(\d)\.', r'.conv\1.bn.', k)
        out[k] = v
    return out


def test_torchvision_imagenet_layout_loads_backbone(server, tmp_path, entries):
    base, www = server
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None)
    fname = _publish(r18.state_dict(), www, 'resnet18')
    entries(PretrainedWeights('resnet18.testnet', ('tsn_r18', 'tsm_r18'), f'{base}/{fname}', 'test', None,
                              clip_recipe(224, 256, segments=8), backbone_only=True))
    torch.hub.set_dir(str(tmp_path / 'hub'))
    m = create_video_model('tsm_r18', 5, pretrained='testnet')
    rep = m.pretrained_report
    assert rep.format == 'torchvision' and set(rep.missing) == {'head.fc.weight', 'head.fc.bias'}   # all but the new head
    assert torch.equal(m.state_dict()['backbone.layer4.1.bn2.running_var'], r18.state_dict()['layer4.1.bn2.running_var'])
    assert 'fc.weight' in rep.unexpected                           # ImageNet's classifier is not a video head
    assert (tmp_path / 'hub' / 'checkpoints' / fname).exists()


def test_mmaction2_layout_predicts_its_classes(server, tmp_path, entries):
    base, www = server
    torch.manual_seed(1)
    src = create_video_model('tsm_r18', 4, num_segments=4).eval()
    fname = _publish({'meta': {'mmaction2_version': '1.2.0', 'epoch': 50}, 'state_dict': _to_mmaction2(src.state_dict())},
                     www, 'tsm_r18_mm')
    classes = ('circle', 'square', 'triangle', 'stripes')
    entries(PretrainedWeights('tsm_r18.mmtest', ('tsm_r18',), f'{base}/{fname}', 'test', classes,
                              clip_recipe(32, 37, segments=4), model_kwargs=dict(num_segments=4)))
    torch.hub.set_dir(str(tmp_path / 'hub'))
    rec = load_recognizer('tsm_r18.mmtest', device='cpu')
    assert rec.vocab == list(classes) and rec.model.pretrained_report.format == 'mmaction2'
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad(): assert torch.allclose(rec.model(x), src(x), atol=1e-5)
    data = make_synthetic_dataset(tmp_path / 'd', n_per_class=1, size=(48, 64), num_frames=(12, 12), classes=list(classes),
                                  valid_pct=0, rawframes=True)
    vid, frames = data.videos[0], data.rawframes[0]
    top = rec(vid, topk=5)
    assert len(top) == 4 and {l for l, _ in top} == set(classes) and abs(sum(s for _, s in top) - 1) < 1e-4
    assert [l for l, _ in rec(frames, topk=2)] == [l for l, _ in rec(frames, topk=2)]      # a frame folder works too
    (www / 'clip.mp4').write_bytes(Path(vid).read_bytes())
    by_url = rec(f'{base}/clip.mp4', topk=4)                                              # and a URL
    assert [l for l, _ in by_url] == [l for l, _ in top]


def test_download_once_then_cache(server, tmp_path, entries):
    base, www = server
    fname = _publish({'w': torch.arange(10.)}, www, 'tiny')
    entries(PretrainedWeights('tsn_r18.tiny', ('tsn_r18',), f'{base}/{fname}', 'test', None, clip_recipe(32, 37, segments=4)))
    p = download_weights('tsn_r18.tiny', cache_dir=tmp_path / 'c', progress=False)
    assert p == weights_path('tsn_r18.tiny', tmp_path / 'c') and len(_Handler.hits) == 1
    assert download_weights('tsn_r18.tiny', cache_dir=tmp_path / 'c') == p and len(_Handler.hits) == 1
    assert not list((tmp_path / 'c').glob('*.part'))


def test_interrupted_download_resumes(server, tmp_path, entries):
    base, www = server
    fname = _publish({'w': torch.randn(50_000)}, www, 'big')
    size = (www / fname).stat().st_size
    entries(PretrainedWeights('tsn_r18.big', ('tsn_r18',), f'{base}/{fname}', 'test', None, clip_recipe(32, 37, segments=4)))
    _Handler.cut_after = size // 3
    with pytest.raises(WeightsDownloadError) as e:
        download_weights('tsn_r18.big', cache_dir=tmp_path / 'c', progress=False)
    part = tmp_path / 'c' / (fname + '.part')
    assert part.exists() and 0 < part.stat().st_size < size and not (tmp_path / 'c' / fname).exists()
    assert 'incomplete' in str(e.value) or 'failed' in str(e.value)
    _Handler.cut_after = None
    p = download_weights('tsn_r18.big', cache_dir=tmp_path / 'c', progress=False)
    assert _Handler.hits[-1][1] == f'bytes={size // 3}-'                  # the second request asked only for the rest
    assert p.read_bytes() == (www / fname).read_bytes() and not part.exists()


def test_hash_mismatch_is_refused_and_deleted(server, tmp_path, entries):
    base, www = server
    good = _publish({'w': torch.ones(3)}, www, 'w')
    bad = 'w-00000000.pth'
    (www / bad).write_bytes((www / good).read_bytes())                   # right bytes, wrong name: the hash does not match
    entries(PretrainedWeights('tsn_r18.badhash', ('tsn_r18',), f'{base}/{bad}', 'test', None, clip_recipe(32, 37, segments=4)))
    with pytest.raises(WeightsDownloadError, match='expected 00000000'):
        download_weights('tsn_r18.badhash', cache_dir=tmp_path / 'c', progress=False)
    assert not list((tmp_path / 'c').iterdir())                    # nothing left in the cache


def test_offline_message_and_mirror(server, tmp_path, entries, monkeypatch):
    base, www = server
    fname = _publish({'w': torch.ones(3)}, www, 'm')
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); dead = s.getsockname()[1]
    url = f'http://127.0.0.1:{dead}/models/{fname}'
    entries(PretrainedWeights('tsn_r18.mirrored', ('tsn_r18',), url, 'test', None, clip_recipe(32, 37, segments=4)))
    with pytest.raises(WeightsDownloadError) as e:
        download_weights('tsn_r18.mirrored', cache_dir=tmp_path / 'c', progress=False, timeout=5)
    msg = str(e.value)
    assert url in msg and fname in msg and str(tmp_path / 'c') in msg and WEIGHTS_MIRROR_ENV in msg
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, base + '/')                 # the same file name under the mirror's base URL
    p = download_weights('tsn_r18.mirrored', cache_dir=tmp_path / 'c', progress=False)
    assert p.read_bytes() == (www / fname).read_bytes() and _Handler.hits[-1][0] == f'/{fname}'


def test_real_entries_are_complete():
    for name in ('tsn_r50.kinetics400', 'tsm_r50.kinetics400', 'i3d_r50.kinetics400', 'r3d_18.kinetics400',
                 'swin3d_t.kinetics400', 'resnet101.imagenet1k_v2', 'tsm_r18.synth'):
        e = get_pretrained(name)
        assert e.classes and e.recipe.mean and e.recipe.std and e.recipe.size > 0, name
        if e.url:
            assert e.url.startswith('https://') and re.fullmatch(r'[0-9a-f]{8,}', e.hash_prefix), name
            assert e.metrics['top1'] > 50, name
        m = create_video_model(e.model, len(e.classes), **e.model_kwargs)   # every entry's model can be built
        assert m.default_cfg['model'] == e.model


def test_cli_predict_train_and_models_with_zoo_names(server, tmp_path, entries, capsys):
    "`vidkit predict NAME video`, `vidkit train --pretrained NAME`, `vidkit zoo download/path`, `vidkit models --pretrained`."
    from vidkit.cli import main
    base, www = server
    torch.manual_seed(2)
    src = create_video_model('tsn_r18', 3, num_segments=2)
    classes = ('circle', 'square', 'triangle')
    fname = _publish(src.state_dict(), www, 'tsn_cli')
    entries(PretrainedWeights('tsn_r18.clitest', ('tsn_r18',), f'{base}/{fname}', 'test', classes,
                              clip_recipe(32, 37, segments=2), model_kwargs=dict(num_segments=2)))
    torch.hub.set_dir(str(tmp_path / 'hub'))
    data = make_synthetic_dataset(tmp_path / 'd', n_per_class=3, size=(48, 64), num_frames=(8, 10), classes=list(classes),
                                  rawframes=False)
    assert main(['zoo', 'download', 'tsn_r18.clitest']) == 0
    assert main(['zoo', 'path', 'tsn_r18.clitest']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / 'hub' / 'checkpoints' / fname)
    assert main(['predict', 'tsn_r18.clitest', str(data.videos[0]), '--json', '--topk', '2']) == 0
    import json
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(pred['predictions']) == 2 and pred['predictions'][0][0] in classes
    work = tmp_path / 'work'
    assert main(['train', '--arch', 'tsn_r18', '--data', str(data.root), '--frames', '2', '--size', '32', '--bs', '4',
                 '--epochs', '1', '--workers', '0', '--pretrained', 'clitest', '--work-dir', str(work), '--no-bar']) == 0
    assert (work / 'models' / 'last.pth').exists()
    assert main(['train', '--arch', 'tsn_r18', '--data', str(data.root), '--pretrained', 'kinetics400',
                 '--work-dir', str(work), '--epochs', '1']) == 1
    assert "no 'kinetics400' weights for 'tsn_r18'" in capsys.readouterr().err
    assert main(['models', '--pretrained', '*.clitest']) == 0 and 'tsn_r18.clitest' in capsys.readouterr().out
