FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY gateway ./gateway
RUN pip install --no-cache-dir .
EXPOSE 8080 8765
ENTRYPOINT ["tenebra"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
