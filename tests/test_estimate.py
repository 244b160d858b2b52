"""The CPU cost warning's arithmetic (kdbench/estimate.py): grouped runs share the teacher
forward of each batch, solo runs pay it each."""

from kdbench.estimate import StepTimes, grid_seconds, step_times
from kdbench import settings


def test_grid_seconds_counts_one_teacher_forward_per_group_and_a_student_step_per_run():
    times = StepTimes(teacher_forward=0.4, student_step=0.1)
    # 6 runs of 10 steps alone: 6 x 10 x (0.4 + 0.1); in one group: 10 x (0.4 + 6 x 0.1).
    assert abs(grid_seconds(6, 6, 10, times) - 30.0) < 1e-9
    assert abs(grid_seconds(6, 1, 10, times) - 10.0) < 1e-9
    # Two seeds, one group each.
    assert abs(grid_seconds(12, 2, 10, times) - 20.0) < 1e-9


def test_step_times_time_the_teacher_only_when_there_is_one():
    setting = settings.SETTINGS["synthetic/tiny"]
    with_teacher = step_times(setting.student, setting.teacher, setting, 8)
    alone = step_times(setting.student, None, setting, 8)
    assert with_teacher.teacher_forward > 0 and with_teacher.student_step > 0
    assert alone.teacher_forward == 0.0 and alone.student_step > 0
