"""The built-in stages, registered in execution order."""
from __future__ import annotations

from pipelines.audio_stage import AudioStage
from pipelines.fmri_stage import FmriStage
from pipelines.registry import register
from pipelines.text_stage import TextStage
from pipelines.video_stage import VideoStage

register(FmriStage())
register(VideoStage())
register(AudioStage())
register(TextStage())
