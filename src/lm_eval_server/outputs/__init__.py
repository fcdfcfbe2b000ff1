"""What a job leaves behind, read as data: lm-eval's results and metrics (`results`), samples as
pages (`samples`), comparisons of runs (`compare`), reproduction receipts (`receipts`) and a
reproduction's diff (`reproduction`), bounded reads of the logs (`joblogs`) and lm-eval's
progress bars (`progress`). Everything here reads files a job could have written:
data only, never executed, bounded in size, never through a link out of the job's directory.

May import: runtime.jobdir, config, errors. Never jobs, api or admission.
"""
