// Swagger UI on this service's own document (served at /api). Nothing is fetched from elsewhere:
// no validator badge (validatorUrl: null), the vendored bundle only.
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "/api-json",
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
