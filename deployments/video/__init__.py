"""The video worker side: loads one video pipeline (`video_model.py`: Wan's, or the embedded
tiny Wan), turns a job into frames step by step (cancellable between steps), and the frames
into an MP4 and a thumbnail (`mp4_encoding.py`)."""
