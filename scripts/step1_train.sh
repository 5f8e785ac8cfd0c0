#!/usr/bin/env bash
# Stage 1 of the workflow; settings as in scripts/pipeline.sh.
exec "$(dirname "$0")/pipeline.sh" 1
