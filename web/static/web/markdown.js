// Markdown from the model, rendered so that nothing in it can run: markdown-it with raw HTML
// off (it is shown as text), links only to http(s) and mailto, images shown as links (never
// loaded), then DOMPurify over the result, then links opened in a new tab without an opener.
// The vendored libraries are classic scripts that define window.markdownit and
// window.DOMPurify (see vendor/README.md).

const SAFE_URL = /^(?:https?:|mailto:)/i;

const md = window.markdownit({ html: false, linkify: true, breaks: false, typographer: false });

// markdown-it's own check drops javascript:, vbscript:, file: and most data: URLs; stricter here:
// anything that is not http(s) or mailto (relative links too) stays plain text.
md.validateLink = (url) => SAFE_URL.test(url.trim());

// An image would be fetched from wherever the model points (and the page's CSP refuses other
// origins): show it as a link to the image instead.
md.renderer.rules.image = (tokens, index, options, env, renderer) => {
  const token = tokens[index];
  const src = token.attrGet("src") || "";
  const alt = renderer.renderInlineAsText(token.children || [], options, env) || src;
  const label = md.utils.escapeHtml(`Image: ${alt}`);
  return `<a href="${md.utils.escapeHtml(src)}">${label}</a>`;
};

// Table cell alignment comes as style="text-align:…"; inline styles are refused by the CSP,
// so it becomes a class.
md.core.ruler.push("alignment_classes", (state) => {
  for (const token of state.tokens) {
    if (token.type !== "th_open" && token.type !== "td_open") continue;
    const style = token.attrGet("style");
    if (!style) continue;
    token.attrs = token.attrs.filter(([name]) => name !== "style");
    const match = /text-align:\s*(left|right|center)/.exec(style);
    if (match) token.attrJoin("class", `align-${match[1]}`);
  }
});

const PURIFY_OPTIONS = {
  RETURN_DOM_FRAGMENT: true,
  ALLOWED_URI_REGEXP: SAFE_URL,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe", "video", "audio", "source"],
  FORBID_ATTR: ["style", "srcset", "id", "name"],
  ALLOW_DATA_ATTR: false,
};

window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName !== "A") return;
  const href = node.getAttribute("href");
  if (href && SAFE_URL.test(href.trim())) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  } else {
    node.removeAttribute("href");
    node.removeAttribute("target");
  }
});

function codeBlock(pre) {
  const code = pre.querySelector("code");
  const language = code ? /(?:^|\s)language-([\w+#.-]+)/.exec(code.className) : null;
  const wrapper = document.createElement("div");
  wrapper.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const label = document.createElement("span");
  label.className = "code-lang";
  label.textContent = language ? language[1] : "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-button copy-code";
  copy.setAttribute("aria-label", `Copy ${language ? language[1] + " " : ""}code`);
  const icon = document.createElement("span");
  icon.className = "icon icon-copy";
  icon.setAttribute("aria-hidden", "true");
  const text = document.createElement("span");
  text.className = "copy-label";
  text.textContent = "Copy";
  copy.append(icon, text);
  head.append(label, copy);
  pre.replaceWith(wrapper);
  wrapper.append(head, pre);
  pre.tabIndex = 0; // long lines scroll: reachable with the keyboard
}

/** A DocumentFragment with the rendered, sanitized markdown (code blocks with a Copy button). */
export function renderMarkdown(text) {
  const fragment = window.DOMPurify.sanitize(md.render(text || ""), PURIFY_OPTIONS);
  for (const pre of fragment.querySelectorAll("pre")) codeBlock(pre);
  return fragment;
}
