"""Job launchers with Kaldi's interface: ``LAUNCHER [opts] JOB=1:N log/x.JOB.log command ...``.

One interface, three backends (``local``, ``slurm``, ``stdout``), so a recipe picks where jobs run in
``cmd.sh`` alone. Only the standard library is used: launchers start in tens of milliseconds.
"""
