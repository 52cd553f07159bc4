"""The localizer on 2 CPU processes, in real processes: `torchrun --nproc_per_node 2` (gloo) runs a script that trains
`bmn_tiny` with `localization_learner` inside `learn.distrib_ctx_auto()`. Each rank trains on its half of the
recordings, the gradients are averaged (both ranks end with the same weights), the `ARAN` metric (AR@AN's AUC) that
each rank reports covers all validation videos, each once (fastai's `DistributedDL` pads the last share with a repeat),
and equals a single-process `evaluate_localizer` of the weights; only rank 0 writes checkpoints."""
import json, os, signal, socket, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from test_localization import _toy        # the toy feature files and records of the localization tests

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TORCHRUN = str(BIN / 'torchrun')
EPOCHS = 2
N_TRAIN, N_VALID, BS, T = 16, 7, 2, 16       # 16 train: 8 per rank; 7 valid: padded to 8, rank 1's last one repeats video 0
MODEL_KW = dict(num_samples=4, hidden_dim_1d=16, hidden_dim_2d=8, hidden_dim_3d=16)

TORCH_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'NODE_RANK')
LAUNCHER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'PMIX_', 'MV2_', 'MPI_LOCAL')   # a launch these tests may themselves run in

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from fastai.callback.core import Callback
    from vidkit.core import set_seed
    from vidkit.checkpoint import CheckpointCallback
    from vidkit.distributed import distrib_info, end_distributed
    from vidkit.localization import LocalizationDataset, localization_dataloaders, localization_learner

    train_json, valid_json, feats, work = map(Path, sys.argv[1:5])
    epochs, bs, model_kw = int(sys.argv[5]), int(sys.argv[6]), json.loads(sys.argv[7])
    seen = []                                         # the training videos this process loaded, per epoch

    class Tracked(LocalizationDataset):
        def __getitem__(self, i):
            seen[-1].append(self.records[i].name)
            return super().__getitem__(i)

    class Epochs(Callback):
        def before_train(self): seen.append([])

    set_seed(0)
    dls = localization_dataloaders(train_json, valid_json, feats, temporal_dim=16, bs=bs, seed=0)
    dls.train_ds.__class__ = Tracked
    with open(valid_json) as f: n_valid = len(json.load(f))
    set_seed(0)
    with localization_learner(dls, 'bmn_tiny', path=work, cbs=[Epochs()], **model_kw).distrib_ctx_auto() as learn:
        info = distrib_info()
        learn.path = work/f'rank{info.rank}'         # one folder per process: which processes write checkpoints
        with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 3e-3, cbs=[CheckpointCallback(monitor='auc')])
        stats, aran = dict(learn.distrib_stats), learn.metrics[0]
        local = list(aran.recs)                        # the validation videos this process predicted
        values = [[float(v) for v in vs] for vs in learn.recorder.values]
        again = [float(v) for v in learn.validate()]   # a validation outside the fit: also over all videos
    torch.save(learn.model.state_dict(), work/f'weights{info.rank}.pth')
    out = dict(rank=info.rank, world=info.world_size, backend=info.backend, names=list(learn.recorder.metric_names),
               values=values, validate=again, local_valid=local, seen=seen, model_restored=type(learn.model).__name__, **stats)
    (work/f'rank{info.rank}.json').write_text(json.dumps(out))
    end_distributed()
""")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', PYTHONFAULTHANDLER='1')
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cmd, timeout=150):
    "Run `cmd`; on a hang kill it and every process it started (torchrun's ranks run in their own sessions), then fail."
    import psutil
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
        for q in procs:
            try: q.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess: pass
        out, err = p.communicate(timeout=30)
        pytest.fail(f"{cmd[0]} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    if p.returncode != 0:
        tb = [l for l in err.splitlines() if l.startswith('[rank')]      # the ranks' tracebacks, before torchrun's summary
        pytest.fail(f"exit code {p.returncode}:\n{out[-2000:]}\n" + '\n'.join(tb[-60:] or err.splitlines()[-60:]))
    return out, err


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "Toy features (no video), annotation files, and a 2-process run of the script."
    root = tmp_path_factory.mktemp('locddp')
    train, valid = _toy(root/'f', N_TRAIN, 0, T=T), _toy(root/'f', N_VALID, 1, T=T)
    for name, recs in (('train.json', train), ('valid.json', valid)):
        (root/name).write_text(json.dumps({r.name: r.annotation() for r in recs}))
    (root/'train.py').write_text(SCRIPT)
    work = root/'work'; work.mkdir()
    _run([TORCHRUN, '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(_free_port()),
          str(root/'train.py'), str(root/'train.json'), str(root/'valid.json'), str(root/'f'), str(work), str(EPOCHS), str(BS),
          json.dumps(MODEL_KW)])
    ranks = [json.loads((work/f'rank{r}.json').read_text()) for r in (0, 1)]
    return root, train, valid, work, ranks


def test_ranks_train_on_halves_with_the_same_weights(run):
    _, train, _, work, ranks = run
    assert [(r['rank'], r['world'], r['backend']) for r in ranks] == [(0, 2, 'gloo'), (1, 2, 'gloo')]
    assert ranks[0]['model_restored'] == 'BMN'                       # the DDP wrapper is gone after the context
    # (c) each epoch, each rank loads 8 of the 16 training recordings, and the two halves are the whole set
    assert [r['train_items'] for r in ranks] == [N_TRAIN // 2 * EPOCHS] * 2
    for e in range(EPOCHS):
        a, b = (set(r['seen'][e]) for r in ranks)
        assert len(ranks[0]['seen'][e]) == len(a) == N_TRAIN // 2 and len(b) == N_TRAIN // 2
        assert not a & b and a | b == {r.name for r in train}
    assert ranks[0]['seen'][0] != ranks[0]['seen'][1]                # reshuffled every epoch
    # (a) the gradients were averaged: one model
    w0, w1 = (torch.load(work/f'weights{r}.pth', weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(w0['x_1d_s.2.weight'], _untrained()['x_1d_s.2.weight'])   # and it did train


def _untrained():
    from vidkit.core import set_seed
    from vidkit.localization import create_localizer
    set_seed(0)
    return create_localizer('bmn_tiny', temporal_dim=T, feat_dim=8, **MODEL_KW).state_dict()


def test_auc_on_every_rank_is_the_single_process_auc(run):
    "(b) the AUC each rank records (every epoch's, and a `validate` afterwards) is that of the weights on all 7 videos, in one process."
    from vidkit.localization import load_localizer, evaluate_localizer, average_recall_at_avg_proposals
    torch.set_num_threads(1)
    root, _, valid, work, ranks = run
    assert ranks[0]['names'][-2] == 'auc' and ranks[0]['values'] == ranks[1]['values'] and len(ranks[0]['values']) == EPOCHS
    model = load_localizer(work/'rank0'/'models'/'last.pth', 'cpu')
    w = torch.load(work/'weights0.pth', weights_only=True)
    assert all(torch.equal(v, w[k]) for k, v in model.state_dict().items())      # the checkpoint holds the final weights
    res, props = evaluate_localizer(model, root/'valid.json', root/'f', device='cpu')
    for r in ranks:
        auc = r['values'][-1][-1]                                     # the last epoch's [train_loss, valid_loss, auc]
        assert abs(auc - res.auc) < 1e-6, (r['rank'], auc, res.auc)
        assert abs(r['validate'][1] - res.auc) < 1e-6
    # each rank predicted its share only: 4 videos, rank 1's last one the padding (video 0 again) ...
    assert ranks[0]['local_valid'] == [v.name for v in valid[:4]]
    assert ranks[1]['local_valid'] == [v.name for v in valid[4:]] + [valid[0].name]
    # ... and the test can tell: the AUC of one rank's share is another number
    halves = [average_recall_at_avg_proposals([v for v in valid if v.name in r['local_valid']],
                                              {k: props[k] for k in r['local_valid']}).auc for r in ranks]
    assert all(abs(h - res.auc) > 1e-3 for h in halves), (halves, res.auc)


def test_only_rank0_writes_checkpoints(run):
    "(d) each rank's learner has its own folder: only rank 0's holds checkpoints."
    _, _, _, work, _ = run
    assert sorted(str(p.relative_to(work/'rank0')) for p in (work/'rank0').rglob('*') if p.is_file()) == ['models/best.pth', 'models/last.pth']
    assert not (work/'rank1').exists() or not [p for p in (work/'rank1').rglob('*') if p.is_file()]
    assert torch.load(work/'rank0'/'models'/'last.pth', weights_only=True)['epoch'] == EPOCHS
