"""Priorities and deadlines of image jobs: what the ingress stamps on each job and the
generator orders its waiting work by (`job_schedule.py`), and when a job is refused because
it cannot finish in time (`deadline_admission.py`)."""
