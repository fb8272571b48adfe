(() => {
  "use strict";
  const grid = document.getElementById("grid");
  const cards = Array.from(grid.children);
  const search = document.getElementById("search");
  const changedOnly = document.getElementById("changed-only");
  const shown = document.getElementById("shown");
  const empty = document.getElementById("empty");
  const filters = Array.from(document.querySelectorAll("[data-filter]"));
  const viewer = document.getElementById("viewer");
  const stage = viewer.querySelector(".stage");
  const before = document.getElementById("v-before");
  const after = document.getElementById("v-after");
  const slider = document.getElementById("v-slider");
  const modes = Array.from(viewer.querySelectorAll(".modes [data-mode]"));
  const openLink = document.getElementById("v-open");
  const title = document.getElementById("v-title");
  const note = document.getElementById("v-note");
  let status = "all";
  let current = null;

  // What the search looks in: the id, the prompt and the text sent (read once from the page).
  const haystacks = new Map(cards.map((card) => [
    card,
    Array.from(card.querySelectorAll("[data-search]"), (node) => node.textContent)
      .join("\n").toLowerCase(),
  ]));

  function plural(count) {
    return `${count} shot${count === 1 ? "" : "s"}`;
  }

  function update() {
    const terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    let count = 0;
    for (const card of cards) {
      const visible = (status === "all" || card.dataset.status === status)
        && (!changedOnly.checked || card.dataset.changed === "1")
        && terms.every((term) => haystacks.get(card).includes(term));
      card.hidden = !visible;
      if (visible) count += 1;
    }
    shown.textContent = count === cards.length
      ? plural(count) : `${count} of ${plural(cards.length)}`;
    empty.hidden = count > 0;
  }

  for (const button of filters) {
    button.addEventListener("click", () => {
      status = button.dataset.filter;
      for (const other of filters) other.setAttribute("aria-pressed", String(other === button));
      update();
    });
  }
  search.addEventListener("input", update);
  changedOnly.addEventListener("change", update);

  function setMode(mode) {
    stage.dataset.mode = mode;
    for (const button of modes) {
      button.setAttribute("aria-pressed", String(button.dataset.mode === mode));
    }
  }

  function open(card) {
    current = card;
    const [first, second] = card.querySelectorAll("a.thumb");
    const pair = Boolean(second);
    title.textContent = card.dataset.id;
    const mark = card.querySelector(".mark");
    note.textContent = mark ? `${mark.textContent}: ${mark.title}` : "";
    if (pair) {
      before.src = first.getAttribute("href");
      after.src = second.getAttribute("href");
      openLink.href = second.getAttribute("href");
      stage.classList.add("show-after");
      setMode(stage.dataset.mode === "single" ? "side" : stage.dataset.mode);
    } else if (first) {
      before.removeAttribute("src");
      after.src = first.getAttribute("href");
      openLink.href = first.getAttribute("href");
      setMode("single");
    } else {
      return;
    }
    if (!viewer.open) viewer.showModal();
  }

  function step(direction) {
    const visible = cards.filter((card) => !card.hidden && card.querySelector("a.thumb"));
    const index = visible.indexOf(current);
    const next = visible[index + direction];
    if (next) {
      open(next);
      next.scrollIntoView({ block: "nearest" });
    }
  }

  grid.addEventListener("click", (event) => {
    const link = event.target.closest("a.thumb");
    if (link) {
      // Without the script the link still opens the full image on its own.
      event.preventDefault();
      open(link.closest(".card"));
      return;
    }
    const clamp = event.target.closest(".clamp");
    if (clamp) clamp.classList.toggle("open");
  });

  for (const button of modes) button.addEventListener("click", () => setMode(button.dataset.mode));
  slider.addEventListener("input", () => stage.style.setProperty("--split", slider.value));
  stage.addEventListener("click", () => {
    if (stage.dataset.mode === "toggle") stage.classList.toggle("show-after");
  });
  document.getElementById("v-close").addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (event) => {
    if (event.target === viewer) viewer.close();
  });
  viewer.addEventListener("close", () => {
    before.removeAttribute("src");
    after.removeAttribute("src");
    if (current) current.querySelector("a.thumb")?.focus({ preventScroll: true });
  });

  document.addEventListener("keydown", (event) => {
    if (viewer.open) {
      if (event.key === "ArrowRight") step(1);
      else if (event.key === "ArrowLeft") step(-1);
      else if (event.key.toLowerCase() === "t" && stage.dataset.mode !== "single") {
        setMode("toggle");
        stage.classList.toggle("show-after");
      }
      return;
    }
    if (event.key === "/" && document.activeElement !== search) {
      event.preventDefault();
      search.focus();
    } else if (event.key === "Escape" && document.activeElement === search) {
      search.value = "";
      update();
    }
  });

  update();
})();
