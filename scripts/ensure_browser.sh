# Sourced by test.sh: the report test renders report.html in headless Chromium, so make sure a
# browser is on PATH. Debian/Ubuntu as root: installed quietly with apt-get when missing; anywhere
# else the report test fails and says what to install.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing headless Chromium for the report test (apt-get, first run only)" >&2
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 \
      || echo "warning: apt-get could not install chromium; the report's browser test will fail" >&2
  else
    echo "warning: no chromium on PATH (Debian: sudo apt-get install chromium); the report's browser test will fail" >&2
  fi
fi
