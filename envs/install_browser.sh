#!/usr/bin/env bash
# Debian's headless Chromium and its WebDriver, for tests/test_mlflow_ui.py (the MLflow UI in a
# real browser). Idempotent: does nothing when both are installed. Needs root (apt-get).
#   sudo bash envs/install_browser.sh
set -euo pipefail

if command -v chromium >/dev/null && [ -x /usr/bin/chromedriver ]; then
    echo "install_browser: chromium and chromedriver already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: needs root to apt-get install chromium chromium-driver; rerun with sudo" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install_browser: apt-get not found; install chromium and its chromedriver with your package manager" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium chromium-driver
echo "install_browser: $(chromium --version) and $(/usr/bin/chromedriver --version | head -n1)"
