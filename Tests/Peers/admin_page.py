"""The admin page in a real browser (Debian's Chromium, driven by Selenium from PyPI), while a host is ejected.

Usage: admin_page.py URL SIGNAL_FILE

Loads the page and checks what an SRE reads there: the ejected host's box names the cause in words, the sparklines
and the cluster chart are drawn from data, healing decisions are listed with key=value evidence and can be filtered.
Then it writes SIGNAL_FILE, sees the decision the test makes then arrive within a second (SIGNAL_FILE.seen), and
waits for Vigil's admin port to go away (the test stops it): the page must say it is stale, and the console must hold
no script error (the browser's own lines for refused connections aside). It writes SIGNAL_FILE.stale, and the page
must be live again once the test brings the port back. Prints what it saw; exits 1 at the first expectation that
fails.
"""
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def wait(what, check, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # the page is redrawn under us: look again
            pass
        time.sleep(0.1)
    print(f"FAIL: {what}", flush=True)
    sys.exit(1)


def main():
    url, signal = sys.argv[1], sys.argv[2]
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=800,1200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url)
        cause = wait("an ejected host's box naming its cause",
                     lambda: next((e.text for e in driver.find_elements(By.CSS_SELECTOR, ".host.ejected .cause")
                                   if "in a row" in e.text), None))
        print(f"cause: {cause}", flush=True)
        names = sorted(h.find_element(By.CSS_SELECTOR, ".addr").text for h in driver.find_elements(By.CSS_SELECTOR, ".host"))
        print(f"names: {', '.join(names)}", flush=True)
        points = wait("a sparkline drawn from data",
                      lambda: next((p.get_attribute("points") for p in driver.find_elements(By.CSS_SELECTOR, "svg.spark polyline")
                                    if p.get_attribute("points")), None))
        print(f"sparkline points: {len(points.split())}", flush=True)
        wait("the cluster chart drawn from data",
             lambda: any(p.get_attribute("points") for p in driver.find_elements(By.CSS_SELECTOR, "svg.chart polyline")))
        row = wait("the ejection among the healing decisions, with key=value evidence",
                   lambda: next((r.text for r in driver.find_elements(By.CSS_SELECTOR, "#events tr")
                                 if "host_ejected" in r.text and "=" in r.text and "{" not in r.text.split("→")[0]), None))
        print(f"event: {row}", flush=True)
        # Filtering by kind hides the other kinds (the test made a decision of another kind before the page opened).
        wait("a decision of another kind", lambda: any("health_check_passed" in r.text for r in driver.find_elements(By.CSS_SELECTOR, "#events tr")))
        driver.execute_script("const s = document.getElementById('kindFilter'); s.value = 'host_ejected'; s.onchange();")
        rows = driver.find_elements(By.CSS_SELECTOR, "#events tr")
        shown = [r.text for r in rows if r.is_displayed()]
        if not shown or not all("host_ejected" in r for r in shown) or len(shown) == len(rows):
            print(f"FAIL: the kind filter shows {shown} of {len(rows)} rows", flush=True)
            sys.exit(1)
        driver.execute_script("const s = document.getElementById('kindFilter'); s.value = ''; s.onchange();")
        width, room = driver.execute_script("const d = document.documentElement; return [d.scrollWidth, d.clientWidth]")
        if width > room:
            print(f"FAIL: the page is {width} px wide in {room} px (an 800 px window)", flush=True)
            sys.exit(1)
        # A decision made now shows within a second of being made (the test makes one once the page is checked): the
        # page notes when its row appears, against the decision's own time (one clock: the same machine).
        driver.execute_script("""
          window.seenAt = null;
          new MutationObserver(() => {
            if (!window.seenAt && [...document.querySelectorAll('#events tr')].some(r => r.textContent.includes('page_check'))) window.seenAt = Date.now();
          }).observe(document.getElementById('events'), {childList: true});""")
        open(signal, "w").close()
        latency = wait("the new decision on the page", lambda: driver.execute_script(
            "const e = clusterEvents.find(e => e.reason === 'page_check'); return window.seenAt && e ? window.seenAt - Date.parse(e.time) + 0.5 : null"))
        print(f"new decision shown {latency:.0f} ms after it was made", flush=True)
        if latency > 1000:
            print("FAIL: the new decision took more than a second to show", flush=True)
            sys.exit(1)
        open(signal + ".seen", "w").close()
        status = wait("the stale state once Vigil is away",
                      lambda: (lambda t: t if t.startswith("stale since") else None)(driver.find_element(By.ID, "status").text),
                      seconds=30)
        print(f"status: {status}", flush=True)
        time.sleep(3)  # the event stream's reconnects while it is away
        errors = [e["message"] for e in driver.get_log("browser")
                  if e["level"] == "SEVERE" and "net::ERR_" not in e["message"] and "Failed to load resource" not in e["message"]]
        if errors:
            print(f"FAIL: console errors {errors}", flush=True)
            sys.exit(1)
        # Vigil comes back (the test restarts the admin port once told): the page is live again, without a reload.
        open(signal + ".stale", "w").close()
        wait("the page live again once Vigil answers",
             lambda: driver.find_element(By.ID, "status").text == "live" and "stale" not in driver.find_element(By.TAG_NAME, "body").get_attribute("class"),
             seconds=30)
        print("live again", flush=True)
        print("ok", flush=True)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
