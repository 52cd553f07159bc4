"vidkit.widgets and vidkit.explorer on real decoded videos (VideoDataset, a fastai Learner over it) and in a real kernel (nbclient widget state)."
from pathlib import Path

import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from vidkit.datasets import VideoDataset, VideoRecord
from vidkit.encode import make_test_video
from vidkit.sampling import SampleFrames
from vidkit.widgets import ClipViewer, plot_per_class_accuracy, plot_training_curves
from vidkit.explorer import PredictionExplorer

SIZE = (32, 40)
VOCAB = ['left', 'right', 'still']


@pytest.fixture(scope='module')
def recs(tmp_path_factory):
    "6 small real videos, 2 per class, of different lengths."
    root = tmp_path_factory.mktemp('wid')
    return [VideoRecord(make_test_video(root/VOCAB[k % 3]/f'v{k}.mp4', num_frames=12 + 2 * k, size=SIZE), k % 3)
            for k in range(6)]


def test_clipviewer_on_video_dataset(recs):
    ds = VideoDataset(recs, SampleFrames(clip_len=6, test_mode=True), vocab=VOCAB)
    v = ClipViewer(ds)
    assert (v.num_items, v.num_frames, v.num_views) == (6, 6, 1)
    assert v.names == [f'v{k}.mp4' for k in range(6)] and v.name.value == 'v0.mp4' and v.label_text == 'left'
    assert v.item_box.layout.display is None                       # the item selector is shown for a dataset
    seen = {v.image.value}
    for t in range(1, 6):
        v.slider.value = t                                          # what dragging the slider does
        assert v.frame == t and v.readout.value == '0–5 of 6 frames'
        seen.add(v.image.value)
    assert len(seen) == 6                                           # the gradient moves: every frame differs
    v.item_box.value = 4
    assert v.item == 4 and v.label_text == 'right' and v.name.value == 'v4.mp4' and v.frame == 0
    assert torch.equal(v.clip[0], ds[4][0].as_subclass(torch.Tensor))
    with pytest.raises(IndexError, match='item 6'): v.item = 6


def test_clipviewer_multiview_from_sampler(recs):
    ds = VideoDataset(recs, SampleFrames(clip_len=3, num_clips=2, test_mode=True), vocab=VOCAB)
    v = ClipViewer(ds, fps=2)
    assert v.num_views == 2 and v.num_frames == 3 and v.view_box.layout.display is None and v.play.interval == 500
    v.frame = 1; a = v.image.value
    v.view = 1
    assert v.image.value != a and v.frame == 1 and v.view_box.value == 1


def test_clipviewer_list_and_errors():
    clips = [torch.randint(0, 256, (4 + i, 3, 8, 8), dtype=torch.uint8) for i in range(3)]
    v = ClipViewer(clips, labels=[0, 2, 1], vocab=VOCAB)
    v.item = 1
    assert v.label_text == 'still' and v.num_frames == 5 and v.slider.max == 4 and v.play.max == 4
    v.frame = 4; v.item = 0
    assert v.frame == 0 and v.slider.max == 3                      # a shorter item: the slider follows
    with pytest.raises(ValueError, match='2 labels for 3 items'): ClipViewer(clips, labels=[0, 1])
    with pytest.raises(TypeError, match='clip tensor'): ClipViewer(42)
    with pytest.raises(ValueError, match=r'\(T,C,H,W\)'): ClipViewer(torch.zeros(8, 8))
    with pytest.raises(ValueError, match='fps'): ClipViewer(clips[0], fps=0)


class MeanColour(nn.Module):
    def __init__(self, n): super().__init__(); self.fc = nn.Linear(3, n)
    def forward(self, x): return self.fc(x.float().mean((1, 3, 4)) / 255)


def test_explorer_from_learner_over_video_dataset(recs):
    "A fastai Learner over VideoDatasets: from_learner shows the validation videos and their top-k."
    sampler = SampleFrames(clip_len=4, test_mode=True)
    train, valid = VideoDataset(recs[:3], sampler, vocab=VOCAB), VideoDataset(recs, sampler, vocab=VOCAB)
    dls = DataLoaders.from_dsets(train, valid, bs=2, num_workers=0)
    torch.manual_seed(0)
    learn = Learner(dls, MeanColour(3), loss_func=CrossEntropyLossFlat())
    probs, targs = learn.get_preds()
    ex = PredictionExplorer.from_learner(learn, topk=2)
    assert ex.n == 6 and ex.vocab == VOCAB and ex.names[3] == 'v3.mp4' and ex.true_label(3) == 'left'
    assert torch.allclose(ex.probs, probs)
    ex.index = 3
    assert ex.viewer.item == 3 and ex.viewer.num_frames == 4 and len(ex.topk) == 2
    assert ex.topk[0] == (VOCAB[int(probs[3].argmax())], pytest.approx(float(probs[3].max())))
    assert ex.picker.label == 'v3.mp4  (left)'
    wrong = [i for i in range(6) if probs[i].argmax() != targs[i]]
    ex.show('mistakes')
    assert ex.visible == wrong
    ex.show('all'); ex.index = 1; ex.flag_box.value = True
    assert ex.flagged == {1} and [r.path for r in ex.flagged_items] == [recs[1].path]


def test_explorer_callable_gets_paths(recs):
    "A callable predictor is asked with the record's path, once per video; mistakes are top-1 not the true class."
    asked = []
    def pred(src):
        asked.append(Path(src).name)
        k = int(Path(src).stem[1:])
        guess = VOCAB[k % 3] if k != 4 else 'left'                 # wrong on v4 (a 'right' video)
        return [(guess, 0.8)] + [(c, 0.1) for c in VOCAB if c != guess]
    ds = VideoDataset(recs, SampleFrames(clip_len=4, test_mode=True), vocab=VOCAB)
    ex = PredictionExplorer(pred, ds, topk=3)
    assert asked == ['v0.mp4'] and [c for c, _ in ex.topk] == ['left', 'right', 'still']
    ex.show('mistakes')
    assert ex.visible == [4] and ex.index == 4 and sorted(asked) == [f'v{k}.mp4' for k in range(6)]
    assert 'bar' in ex.bars.value and '#c62828' in ex.bars.value   # the wrong top-1 is red
    assert '6 videos · 1 mistakes (top-1 accuracy 83.3%) · 0 flagged' == ex.summary.value
    ex.flag(); ex.show('flagged')
    assert ex.visible == [4]


def test_plots_from_csv_and_dataframe(tmp_path):
    csv = tmp_path/'history.csv'
    csv.write_text('epoch,train_loss,valid_loss,accuracy,top5_accuracy,time\n'
                   '0,2.0,1.9,0.3,0.8,00:01\n1,1.5,1.6,0.4,0.9,00:01\n2,1.2,1.4,0.5,1.0,00:01\n')
    fig = plot_training_curves(csv)
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]
    assert list(fig.axes[1].get_lines()[1].get_ydata()) == [0.8, 0.9, 1.0]
    fig = plot_training_curves(pd.DataFrame({'epoch': [0, 1], 'train_loss': [1., .5]}))
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == 1   # no metrics: one panel
    with pytest.raises(ValueError, match='no epochs'): plot_training_curves(pd.DataFrame({'epoch': [], 'train_loss': []}))
    (tmp_path/'bad.csv').write_text('a,b\n1,2\n')
    with pytest.raises(ValueError, match="bad.csv: not a fastai history file"): plot_training_curves(tmp_path/'bad.csv')
    n = 30
    rng = np.random.default_rng(0)
    t = rng.integers(0, n, 200); p = np.where(rng.random(200) < 0.6, t, rng.integers(0, n, 200))
    ax = plot_per_class_accuracy(t, p, [f'c{i}' for i in range(n)])
    assert len(ax.patches) == n
    exp = [(p[t == c] == c).mean() if (t == c).any() else 0 for c in range(n)]
    assert np.allclose([b.get_width() for b in ax.patches], exp)
    plt.close('all')


def test_widget_state_saved_by_nbclient(tmp_path):
    "In a real kernel: nbclient stores the widgets' state in the notebook, with the slider where the code put it."
    nbclient = pytest.importorskip('nbclient')
    from nbformat.v4 import new_code_cell, new_notebook
    src = ("import torch\nfrom vidkit.widgets import ClipViewer\n"
           "clip = torch.randint(0, 256, (12, 3, 24, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))\n"
           "viewer = ClipViewer(clip, labels='walking', fps=4)\nviewer.frame = 7\nviewer")
    nb = new_notebook(cells=[new_code_cell(src)],
                      metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=120, store_widget_state=True,
                            resources={'metadata': {'path': str(tmp_path)}}).execute()
    state = nb.metadata.widgets['application/vnd.jupyter.widget-state+json']['state']
    by_name = {}
    for mid, m in state.items(): by_name.setdefault(m['model_name'], []).append((mid, m))
    sliders = [m['state'] for _, m in by_name['IntSliderModel']]
    assert [(s['description'], s['value'], s['max']) for s in sliders] == [('frame', 7, 11)]
    labels = {m['state']['value'] for _, m in by_name['LabelModel']}
    assert {'label: walking', '0–11 of 12 frames'} <= labels
    (_, img), = by_name['ImageModel']
    assert img['state']['format'] == 'jpeg' and any(b['path'] == ['value'] for b in img.get('buffers', []))
    assert by_name['PlayModel'][0][1]['state']['max'] == 11
    view = [o for o in nb.cells[0].outputs if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})]
    assert len(view) == 1
    mid = view[0]['data']['application/vnd.jupyter.widget-view+json']['model_id']
    assert state[mid]['model_name'] == 'VBoxModel'


def test_explorer_video_files_through_predict_video(recs):
    "A Learner or bare model with video files goes through vidkit.inference.predict_video (when that module exists)."
    inference = pytest.importorskip('vidkit.inference', reason='vidkit.inference is not importable yet (it needs vidkit.data)')
    model = MeanColour(3).eval()
    model.default_cfg = dict(input_size=32, mean=[0.5] * 3, std=[0.25] * 3, kind='3d', clip_len=4)   # the test recipe
    expected = inference.predict_video(model, str(recs[0].path), topk=2)
    ex = PredictionExplorer(model, recs[:2], vocab=VOCAB, topk=2)
    assert [c for c, _ in ex.topk] == [VOCAB[int(c)] if str(c).isdigit() else c for c, _ in expected]
    assert [s for _, s in ex.topk] == pytest.approx([float(s) for _, s in expected])
