import pytest
import torch
from torch import nn

from hafis.frameworks.teacher import EMATeacher


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.lin(x)))


def set_values(m: Tiny, w, b, mean, var, tracked):
    with torch.no_grad():
        m.lin.weight.copy_(torch.tensor([w]))
        m.lin.bias.copy_(torch.tensor([b]))
        m.bn.running_mean.fill_(mean)
        m.bn.running_var.fill_(var)
        m.bn.num_batches_tracked.fill_(tracked)


def test_update_is_the_published_arithmetic_for_weights_and_float_buffers():
    student = Tiny()
    set_values(student, [1.0, -2.0], 0.5, 4.0, 2.0, 7)
    teacher = EMATeacher(student)
    set_values(teacher.module, [3.0, 2.0], -1.5, 0.0, 1.0, 3)
    teacher.update(student, 0.75)
    # decay * teacher + (1 - decay) * student, every value exact in binary
    assert teacher.module.lin.weight.tolist() == [[0.75 * 3 + 0.25 * 1, 0.75 * 2 + 0.25 * -2]]
    assert teacher.module.lin.bias.tolist() == [0.75 * -1.5 + 0.25 * 0.5]
    assert teacher.module.bn.running_mean.tolist() == [1.0]
    assert teacher.module.bn.running_var.tolist() == [0.75 + 0.5]
    assert teacher.module.bn.weight.tolist() == [1.0]  # both 1: unchanged
    assert int(teacher.module.bn.num_batches_tracked) == 7  # integer buffers are copied
    # the student is untouched
    assert student.lin.weight.tolist() == [[1.0, -2.0]]


def test_copy_buffers_mode_and_copy_from():
    student = Tiny()
    set_values(student, [1.0, -2.0], 0.5, 4.0, 2.0, 7)
    teacher = EMATeacher(student, buffers="copy")
    set_values(teacher.module, [3.0, 2.0], -1.5, 0.0, 1.0, 3)
    teacher.update(student, 0.5)
    assert teacher.module.lin.weight.tolist() == [[2.0, 0.0]]
    assert teacher.module.bn.running_mean.tolist() == [4.0]
    teacher.copy_from(student)
    for t, s in zip(teacher.module.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(t, s)
    with pytest.raises(ValueError, match="buffers"):
        EMATeacher(student, buffers="own")


def test_warmup_decay():
    d = EMATeacher.warmup_decay
    assert [d(s, 0.99) for s in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert d(99, 0.99) == 0.99 and d(5000, 0.99) == 0.99
    assert d(1, 0.3) == 0.3


def test_teacher_is_a_frozen_eval_mode_copy():
    torch.manual_seed(0)
    student = Tiny().train()
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert all(p.requires_grad for p in student.parameters())
    x = torch.randn(4, 2)
    a, b = teacher(x), teacher(x)
    assert torch.equal(a, b) and not a.requires_grad  # no dropout, no grad
    assert student.training and not teacher.module.training
    state = teacher.state_dict()
    other = EMATeacher(Tiny())
    other.load_state_dict(state)
    assert torch.equal(other(x), a)
